"""The whole lowering: the forward plan, with its training half attached."""

from __future__ import annotations

import dataclasses

from ..description.layers import Layer
from .fusion import core_function, lower_fusion
from .plan import Plan, lower_forward
from .sync import lower_sync
from .train import lower_train


def lower(layer: Layer, target: str = "c") -> Plan:
    """Resolve a layer into the plan every target renders (``target`` picks the element types);
    a fused layer's stages wrap its core functions (lowering/fusion.py)."""
    plan = lower_forward(layer, target)
    plan = dataclasses.replace(plan, train=lower_train(plan))
    fusion = lower_fusion(layer, plan)
    if fusion is None:
        sync = lower_sync(plan) if "sync" in layer.roles and plan.keeps("sync") else None
        return dataclasses.replace(plan, train=dataclasses.replace(plan.train, sync=sync))
    # a fused layer's synchronized statistics are not generated: its stages wrap whole functions
    train = plan.train
    kept = [core_function(f, fusion) for f in train.functions if f.role not in fusion.dropped]
    return dataclasses.replace(plan, fusion=fusion, core_roles=fusion.wrapped,
                               train=dataclasses.replace(train, functions=kept))
