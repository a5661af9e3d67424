"""Counting before weights: ``count`` works on a meta-device model and allocates nothing."""

from __future__ import annotations

from torch import nn

from .planner import Counts, plan
from .spec import load_spec


def count(model: nn.Module, spec, **overrides) -> Counts:
    """Trainable and frozen adapter parameters that ``spec`` would add to ``model`` (per factor, per group)."""
    return plan(model, load_spec(spec, **overrides)).counts
