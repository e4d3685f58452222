"""Data-parallel batch norm: statistics over the global batch with torch.distributed (issue 20).

The batch is split over the processes of a ``torch.distributed`` process group (gloo on CPUs,
NCCL on GPUs); each calls these functions with its own shard on its own compiled layer
(:func:`normgen.build`). Batch norm's generated synchronized functions
(normgen/lowering/sync.py) do the arithmetic; the collectives are torch's:

* :func:`train_forward`: ``NAME_sync_stats`` → ``all_gather`` of every shard's (count, mean, M2)
  (1 + 2·C float64 each) → ``NAME_stats_merge`` in rank order (Chan's formula) →
  ``NAME_sync_finish`` (running update with the global count) → ``NAME_sync_normalize``;
* :func:`backward`: the merged statistics as above, then ``NAME_sync_backward_sums`` →
  ``all_reduce`` (sum) of Σdy and Σdy·(x − mean) (2·C float64) → ``NAME_sync_backward``.

Every process ends with the running statistics, dscale and doffset of one process that saw the
whole batch (PyTorch's SyncBatchNorm computes the same), bit for bit the same on each. A shard
may hold any number of samples, 0 included. PyTorch is imported only here, when called.
"""

from __future__ import annotations

import numpy as np

from .errors import NormgenError


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise NormgenError(
            "normgen.distributed needs PyTorch for its collectives (torch.distributed): pip install torch"
        ) from None
    if not dist.is_available() or not dist.is_initialized():
        raise NormgenError(
            "normgen.distributed: torch.distributed has no process group; call"
            " torch.distributed.init_process_group (gloo on CPUs, nccl on GPUs) in every process first"
        )
    return torch, dist


def _device(torch, dist, group):
    """Where the collectives' tensors live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _require_batchnorm(compiled, what: str) -> None:
    if compiled.layer.kind != "batchnorm":
        raise NormgenError(
            f"normgen.distributed.{what} is for batch norm, whose statistics span the batch; layer"
            f" {compiled.layer.name!r} is {compiled.layer.kind}, which each process computes alone"
        )


def merged_statistics(compiled, x, group=None) -> np.ndarray:
    """The (count, mean[C], M2[C]) of the global batch, float64: every process's shard statistics
    gathered and merged in rank order, the same bits on every process."""
    _require_batchnorm(compiled, "merged_statistics")
    torch, dist = _torch()
    local = compiled.sync_stats(x)
    device = _device(torch, dist, group)
    mine = torch.from_numpy(local).to(device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return compiled.stats_merge(torch.stack(parts).cpu().numpy())


def train_forward(compiled, x, group=None, out=None):
    """Batch norm's training forward of this process's shard ``x`` with the statistics of the
    global batch; updates ``compiled.running_mean``/``running_var`` as one process with the whole
    batch would (the unbiased variance with the global count). Returns y (``out`` may be x)."""
    stats = merged_statistics(compiled, x, group)
    mean, invstd = compiled.sync_finish(stats)
    return compiled.sync_normalize(x, mean, invstd, out)


def backward(compiled, x, dy, group=None):
    """(dx, dscale, doffset) of the training forward for this shard, statistics recomputed from
    the global batch: dx of the shard, dscale = Σdy·x̂ and doffset = Σdy over the global batch (the
    same on every process; None for a parameter the layer lacks)."""
    stats = merged_statistics(compiled, x, group)
    torch, dist = _torch()
    mean, invstd = compiled.sync_finish(stats, update_running=False)
    sums = torch.from_numpy(compiled.sync_backward_sums(x, dy, mean)).to(_device(torch, dist, group))
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return compiled.sync_backward(x, dy, mean, invstd, sums.cpu().numpy(), stats[0])
