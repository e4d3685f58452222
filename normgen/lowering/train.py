"""Lowering of the training half (issue 4): backward, saved statistics, parameter update and
population statistics, on top of the forward :class:`~normgen.lowering.plan.Plan`.

It adds only what the training templates need beyond the forward plan: the entry points, the
index of a statistic in the saved-statistics arrays, how many statistics there are, and the
update step's factors as literals. The loops themselves (statistic loops, domain loops,
accumulators, channel and offset expressions) are the forward plan's.

Saved statistics (``saved_mean``, ``saved_invstd``, accumulator type) hold one value per
statistic, row-major over the kept axes in memory order: batch norm one per channel; group norm
(batch, group); instance norm (batch, channel); layer norm its kept positions. In the loops that
is ``stat_index_expr``: the statistic loops' index times ``nacc``, plus the accumulator ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import ONE, Extent, Function, Plan, literal

#: The four MATLAB factors, in the order the update step uses them.
FACTORS = ("scale_learn_rate_factor", "offset_learn_rate_factor", "scale_l2_factor", "offset_l2_factor")


@dataclass(frozen=True)
class TrainPlan:
    """What the training templates of every target need beyond the forward plan."""

    functions: list[Function]
    stat_index_expr: str  # index into saved_mean/saved_invstd from the statistic loops and k
    stat_count: Extent  # statistics per call (times the batch when B is kept)
    factors: dict[str, str]  # FACTORS → literals in the accumulator type
    stats_type: str  # batch norm's population accumulator struct
    population: bool  # batch norm: stats_reset/accumulate/finalize (some of them), and the stats struct
    update: bool  # run-time parameters: the SGD-with-momentum step (the layer's ``functions`` keep it)
    min_population: int  # values per channel finalize needs (2 for an unbiased variance)
    #: C: the lanes train_forward_save and accumulate sum a chunk in. The statistics they hand out
    #: (saved, population) are the accumulator type's, so their partial sums are too; backward
    #: recomputes its statistics as the forward does, in lanes of the element type.
    save_lane_type: str = "double"
    #: Batch norm's synchronized (data-parallel) functions: normgen/lowering/sync.py (None otherwise).
    sync: object = None

    def function(self, role: str) -> Function:
        return next(f for f in self.functions if f.role == role)

    @property
    def roles(self) -> list[str]:
        return [f.role for f in self.functions]


def stat_index(plan: Plan) -> tuple[str, Extent]:
    """Row-major index over the statistic loops (all kept axes) and then the accumulators."""
    terms: list[str] = []
    mul = Extent(plan.nacc)
    for a in reversed(plan.stat_axes):
        terms.append(a.var if mul == ONE else f"{a.var} * {mul.expr()}")
        mul = mul * a.extent
    terms.reverse()
    if plan.nacc > 1:
        terms.append("k")
    return (" + ".join(terms) if terms else "0"), mul


def lower_train(plan: Plan) -> TrainPlan:
    t, a, name = plan.ctype, plan.acc_type, plan.name
    lead = [f"const {name}_params *params"] if plan.runtime_params else []
    lead_ptr = ["params"] if plan.runtime_params else []
    bn = plan.kind == "batchnorm"
    index, count = stat_index(plan)
    grads = [f"{t} *{g}" for g, _ in plan.gradients]
    grad_ptrs = [g for g, _ in plan.gradients]
    grad_doc = "/".join(grad_ptrs)
    grad_text = (f", and {grad_doc}\n * ({plan.param_per})" if grad_ptrs
                 else "\n * (the layer has no scale or offset, so there are no parameter gradients)")
    per = "one per channel" if bn else f"{plan.upper}_SAVED_STATISTICS({plan.macro_params}) of them"
    if not plan.centered:
        per += "; the mean saved is 0: RMSNorm subtracts none"
    running = [f"{t} *running_mean", f"{t} *running_var"] if bn else []
    fns = [
        Function(
            "train_forward_save",
            f"{name}_train_forward_save",
            lead + [f"const {t} *x", f"{t} *y", "int32_t batch", *plan.size_args, *running, f"{a} *saved_mean",
                    f"{a} *saved_invstd"],
            lead_ptr + ["x", "y", *(["running_mean", "running_var"] if bn else []), "saved_mean", "saved_invstd"],
            (
                "Training forward that also saves each statistic's mean and 1/sqrt(var + epsilon)"
                f" ({per}) for\n * {name}_backward_saved"
                + (
                    ". Updates running_mean/running_var as train_forward does."
                    if bn
                    else "; y is what predict computes."
                )
                + " y may be x."
            ),
            plan.affine_uses,
        ),
        Function(
            "backward",
            f"{name}_backward",
            lead + [f"const {t} *x", f"const {t} *dy", f"{t} *dx", *grads, "int32_t batch", *plan.size_args],
            lead_ptr + ["x", "dy", "dx", *grad_ptrs],
            (
                "Backward of the training forward"
                + (" (batch statistics)" if bn else "")
                + f", statistics recomputed from x: dx{grad_text}. dx may be x or dy."
            ),
            ["scale"],
        ),
        Function(
            "backward_saved",
            f"{name}_backward_saved",
            lead
            + [
                f"const {t} *x",
                f"const {t} *dy",
                f"const {a} *saved_mean",
                f"const {a} *saved_invstd",
                f"{t} *dx",
                *grads,
                "int32_t batch",
                *plan.size_args,
            ],
            lead_ptr + ["x", "dy", "saved_mean", "saved_invstd", "dx", *grad_ptrs],
            (
                f"{name}_backward with the statistics saved by {name}_train_forward_save for the same x and batch.\n"
                " * dx may be x or dy."
            ),
            ["scale"],
        ),
    ]
    if bn:
        fns += [
            Function(
                "backward_frozen",
                f"{name}_backward_frozen",
                lead
                + [f"const {t} *x", f"const {t} *dy", f"{t} *dx", *grads, "int32_t batch", *plan.size_args],
                lead_ptr + ["x", "dy", "dx", *grad_ptrs],
                (
                    "Backward with the trained statistics held fixed (the gradient of predict): fine-tuning\n"
                    " * with frozen batch norm. dx may be x or dy."
                ),
                ["scale", "trained_mean", "trained_variance"],
            ),
            Function(
                "stats_reset",
                f"{name}_stats_reset",
                [f"{name}_stats *acc"],
                ["acc"],
                "Empty a population-statistics accumulator.",
                [],
            ),
            Function(
                "accumulate",
                f"{name}_accumulate",
                [f"{name}_stats *acc", f"const {t} *x", "int32_t batch", *plan.size_args],
                ["acc", "x"],
                "Merge one batch into the population statistics (two-pass per batch, Chan's merge).",
                [],
            ),
            Function(
                "finalize",
                f"{name}_finalize",
                [f"const {name}_stats *acc", f"{t} *trained_mean", f"{t} *trained_variance"],
                ["acc", "trained_mean", "trained_variance"],
                (
                    "The trained mean and variance ("
                    + ("unbiased, M2 / (n - 1)" if plan.running_unbiased else "biased, M2 / n")
                    + ") of everything accumulated,\n * one per channel"
                    + (
                        " (pass params->trained_mean, params->trained_variance to train the run-time parameters)"
                        if plan.runtime_params
                        else ""
                    )
                    + "."
                ),
                [],
            ),
        ]
    learn = plan.learnables
    if plan.runtime_params and learn:
        fns.append(
            Function(
                "update",
                f"{name}_update",
                [
                    f"{name}_params *params",
                    *[f"const {t} *d{k}" for k in learn],
                    *[f"{t} *velocity_{k}" for k in learn],
                    f"{t} learn_rate",
                    f"{t} l2",
                    f"{t} momentum",
                ],
                ["params", *[f"d{k}" for k in learn], *[f"velocity_{k}" for k in learn]],
                (
                    f"One SGD-with-momentum step (MATLAB 'sgdm') on {' and '.join('params->' + k for k in learn)}:\n"
                    " *   v = momentum * v - learn_rate * lr_factor * (grad + l2 * l2_factor * p); p = p + v\n"
                    " * with the layer's ScaleLearnRateFactor/OffsetLearnRateFactor and ScaleL2Factor/OffsetL2Factor.\n"
                    " * velocity_scale/velocity_offset (one per channel) start at zero and carry between steps."
                ),
                [],
            )
        )
    fns = [f for f in fns if plan.keeps(f.role)]
    kept = {f.role for f in fns}
    return TrainPlan(
        functions=fns,
        stat_index_expr=index,
        stat_count=count,
        factors={f: literal(plan.learn_factors[f], a) for f in FACTORS},
        stats_type=f"{name}_stats",
        population=bn and (bool(kept & {"stats_reset", "accumulate", "finalize"}) or plan.keeps("sync")),
        update="update" in kept,
        min_population=2 if plan.running_unbiased else 1,
        save_lane_type=plan.acc_type,
    )
