"""The whole lowering: the forward plan, with its training half attached."""

from __future__ import annotations

import dataclasses

from ..description.layers import Layer
from .plan import Plan, lower_forward
from .sync import lower_sync
from .train import lower_train


def lower(layer: Layer, target: str = "c") -> Plan:
    """Resolve a layer into the plan every target renders (``target`` picks the element types)."""
    plan = lower_forward(layer, target)
    train = dataclasses.replace(lower_train(plan), sync=lower_sync(plan))
    return dataclasses.replace(plan, train=train)
