"""How a run adapts a model: a config (a preset retargeted to the model's q/k/v, a tying spec file with its own
targets, or a ``peft:`` file of PEFT's own method) at a rank, applied for training or counted on a meta-device twin.
Below :mod:`.grid` (which counts every cell before a run) and :mod:`.parts` (which trains them).
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import torch
import yaml

import tying

from ...errors import SelectorError
from .. import transformers as tx
from .models import targets_hint
from .runconfig import ConfigError


class Adapted(typing.NamedTuple):
    """An adapted model's trainable count and how its adapter is saved (``save(folder)``)."""

    trainable: int
    save: typing.Callable[[Path], object]


def adapt(model, config: str, rank: int, seed: int) -> Adapted:
    """Apply ``config`` at ``rank`` (q/k/v; prefix kinds: the attention modules), factors in float32
    whatever the base's dtype (master weights). Presets whose random init has no seed of its own
    (LoRA's A, bottleneck A) draw from torch's global RNG, so seed it here: otherwise "seed 0" would
    give a different LoRA init in every process. A ``peft:`` file (:func:`peft_settings`) builds PEFT's own
    method with ``peft.get_peft_model`` instead, its layers in ``model`` itself (trained and scored as ours)."""
    torch.manual_seed(seed)
    settings = peft_settings(config)
    if settings is not None:
        wrapped = _peft_model(model, settings, rank)
        return Adapted(wrapped.get_nb_trainable_parameters()[0], wrapped.save_pretrained)
    counts = tying.apply_(model, spec_of(model, config, rank), dtype=torch.float32)
    return Adapted(counts.trainable, lambda folder: tying.save_adapter(model, folder))


def trainable_of(model, config: str, rank: int) -> int:
    """``config``'s trainable count at ``rank`` on ``model`` (a meta-device twin: no weights), as a run adapts."""
    settings = peft_settings(config)
    if settings is None:
        return tying.count(model, spec_of(model, config, rank)).trainable
    return _peft_model(copy.deepcopy(model), settings, rank).get_nb_trainable_parameters()[0]


def spec_of(model, config: str, rank: int):
    """A preset retargeted to this model's q/k/v (its family's names), or a YAML spec with its own targets as written."""
    if config.endswith((".yaml", ".yml")):
        return tying.load_spec(config, rank=rank)
    try:
        return tx.spec(model, config, rank=rank)
    except SelectorError as e:
        if "no known attention naming" not in str(e):
            raise
        raise SelectorError(f"{e}: {targets_hint(model)}") from e


def peft_settings(config: str) -> dict | None:
    """A config file of PEFT's own method, ``peft: {peft_type: LILY, r: 8, target_modules: [...], ...}`` (the
    mapping ``peft.get_peft_config`` takes; the cell's rank replaces ``r``): its mapping; None for a preset or a
    tying spec file. A cross-check of PEFT's implementation in the same harness (same data, steps, rates, scoring)."""
    if not config.endswith((".yaml", ".yml")) or not Path(config).is_file():
        return None
    data = yaml.safe_load(Path(config).read_text())
    if not isinstance(data, dict) or "peft" not in data:
        return None
    if set(data) != {"peft"} or not isinstance(data["peft"], dict) or "peft_type" not in data["peft"]:
        raise ConfigError(f"{config}: a PEFT config file holds one key, peft, a mapping with peft_type (e.g. "
                          "peft: {peft_type: LILY, r: 8, target_modules: [q_proj, v_proj]}); "
                          f"got keys {sorted(data)}")
    return data["peft"]


def _peft_model(model, settings: dict, rank: int):
    """PEFT's ``get_peft_model`` of ``settings`` at ``rank`` (``r``); PEFT's own errors name what it refuses."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("a peft: config needs PEFT: pip install peft") from e
    try:
        cfg = peft.get_peft_config({**settings, "r": rank})
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"peft config {settings}: {e}") from e
    return peft.get_peft_model(model, cfg)
