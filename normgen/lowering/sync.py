"""Lowering of batch norm's synchronized (data-parallel) training functions (issue 20).

Batch norm is the one kind whose statistics span the batch, so a batch split over processes
needs them merged: the training forward and backward are cut at their reductions, and a
collective (an all-gather, an all-reduce) carries what each process summed between the cuts.

Forward, per process (``x`` its shard):

1. ``NAME_sync_stats``: the shard's (count, mean, M2) per channel, in double, into a
   ``NAME_stats`` (the population-statistics struct: 1 + 2·C doubles, no padding);
2. all-gather the ``NAME_stats`` of every process, then ``NAME_stats_merge`` them in rank order
   (Chan's formula, exact and stable: every process gets the same bits);
3. ``NAME_sync_finish``: the running update from the merged statistics (the global count in the
   unbiased variance) and each channel's mean and 1/sqrt(var + epsilon);
4. ``NAME_sync_normalize``: y of the shard from them.

Backward: ``NAME_sync_backward_sums`` (Σdy and Σdy·(x − mean) per channel, double, about the
global mean) → all-reduce (sum) → ``NAME_sync_backward`` (dx of the shard, dscale, doffset from
the global sums).

An empty shard (``batch = 0``) takes part: its statistics have count 0, its sums are 0, and it
gets the same running statistics and gradients as the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Function, Plan


@dataclass(frozen=True)
class SyncPlan:
    """What the synchronized functions' templates need beyond the forward and training plans."""

    functions: list[Function]
    stats_type: str  # NAME_stats: count, mean[C], m2[C] (double)
    min_count: int  # merged values per channel sync_finish needs (2 for an unbiased variance)
    stats_doubles: int  # doubles in one NAME_stats: what the all-gather carries per process
    sums_doubles: int  # doubles of the backward's sums: what the all-reduce carries

    def function(self, role: str) -> Function:
        return next(f for f in self.functions if f.role == role)

    @property
    def roles(self) -> list[str]:
        return [f.role for f in self.functions]


def lower_sync(plan: Plan) -> SyncPlan | None:
    """The synchronized functions of a batch norm (None for the other kinds: their statistics
    never span the batch, so a data-parallel shard computes them alone)."""
    if plan.kind != "batchnorm":
        return None
    t, name, c = plan.ctype, plan.name, plan.channels
    lead = [f"const {name}_params *params"] if plan.runtime_params else []
    lead_ptr = ["params"] if plan.runtime_params else []
    st = f"{name}_stats"
    grads = [f"{t} *{g}" for g, _ in plan.gradients]
    grad_ptrs = [g for g, _ in plan.gradients]
    shard = "batch may be 0: an empty shard"
    fns = [
        Function(
            "sync_stats",
            f"{name}_sync_stats",
            [f"const {t} *x", f"{st} *local", "int32_t batch", *plan.size_args],
            ["x", "local"],
            "Data-parallel step 1: this shard's count, mean and M2 per channel, in double (batch may be\n"
            " * 0: an empty shard, count 0). Gather every shard's and merge them with " + f"{name}_stats_merge.",
            [],
        ),
        Function(
            "stats_merge",
            f"{name}_stats_merge",
            [f"{st} *acc", f"const {st} *part"],
            ["acc", "part"],
            "Data-parallel step 2: merge part into acc (Chan's formula, per channel, in double):\n"
            " *   n = na + nb, delta = mean_b - mean_a, mean = mean_a + delta * nb / n,\n"
            " *   M2 = M2_a + M2_b + delta^2 * na * nb / n\n"
            " * exact and stable; a part with count 0 leaves acc as it is. Merge the gathered parts in the same\n"
            " * order on every process (rank order, into a zeroed acc) and every process gets the same bits.",
            [],
        ),
        Function(
            "sync_finish",
            f"{name}_sync_finish",
            [f"const {st} *global", f"{t} *running_mean", f"{t} *running_var", "double *saved_mean",
             "double *saved_invstd"],
            ["global", "saved_mean", "saved_invstd"],
            "Data-parallel step 3: from the merged statistics, each channel's mean and 1/sqrt(var + epsilon)\n"
            " * (saved_mean, saved_invstd: what sync_normalize and the backward take) and the running update\n"
            " * as train_forward makes it for the whole batch ("
            + ("unbiased: M2 / (count - 1) with the global count" if plan.running_unbiased
               else "biased: M2 / count")
            + ").\n * running_mean and running_var may both be NULL: no running update (the backward's statistics).\n"
            f" * With fewer than {2 if plan.running_unbiased else 1} value{'s' if plan.running_unbiased else ''}"
            f" per channel merged it returns {plan.upper}_ERR_COUNT and writes nothing.",
            [],
        ),
        Function(
            "sync_normalize",
            f"{name}_sync_normalize",
            lead + [f"const {t} *x", "const double *saved_mean", "const double *saved_invstd", f"{t} *y",
                    "int32_t batch", *plan.size_args],
            lead_ptr + ["x", "saved_mean", "saved_invstd", "y"],
            f"Data-parallel step 4: y of this shard, normalized with the merged statistics ({shard}).\n"
            " * y may be x.",
            plan.affine_uses,
        ),
        Function(
            "sync_backward_sums",
            f"{name}_sync_backward_sums",
            [f"const {t} *x", f"const {t} *dy", "const double *saved_mean", "double *sums", "int32_t batch",
             *plan.size_args],
            ["x", "dy", "saved_mean", "sums"],
            f"Data-parallel backward step 1: this shard's sums per channel, in double: sums[c] = sum(dy),\n"
            f" * sums[{c} + c] = sum(dy * (x - saved_mean[c])) (batch 0: zeros). All-reduce them (sum) over\n"
            f" * the processes, then {name}_sync_backward.",
            [],
        ),
        Function(
            "sync_backward",
            f"{name}_sync_backward",
            lead + [f"const {t} *x", f"const {t} *dy", "const double *saved_mean", "const double *saved_invstd",
                    "const double *sums", "double count", f"{t} *dx", *grads, "int32_t batch", *plan.size_args],
            lead_ptr + ["x", "dy", "saved_mean", "saved_invstd", "sums", "dx", *grad_ptrs],
            "Data-parallel backward step 2: dx of this shard from the all-reduced sums and count, the merged\n"
            " * statistics' count"
            + (f"; {'/'.join(grad_ptrs)} from the sums (every process gets the same)" if grad_ptrs else "")
            + f".\n * {shard}; dx may be x or dy.",
            ["scale"],
        ),
    ]
    return SyncPlan(
        functions=fns,
        stats_type=st,
        min_count=2 if plan.running_unbiased else 1,
        stats_doubles=1 + 2 * c,
        sums_doubles=2 * c,
    )
