"""A tied adapter as a PEFT method: ``peft.get_peft_model(model, TyingConfig(spec="tl6", rank=8))``.

PEFT looks its methods up in tables keyed by the config's ``peft_type``. Its ``register_peft_method`` accepts only the
names of its own enum, but the tables take any string, so :func:`register` puts ``"TYING"`` into them; it runs when
``peft`` is imported in a process where tying is installed (``_tying_bridges``; no ``import tying`` needed), so
``PeftModel.from_pretrained``, ``AutoPeftModel*``, transformers' ``load_adapter`` and the lm-eval CLI load a
TyingConfig folder. The tuner applies each PEFT adapter as a named tying adapter (``tying.apply_(..., name=)``),
so PEFT's verbs act on tied adapters: several on one model (``add_adapter``, ``set_adapter``, ``delete_adapter``,
``forward(adapter_names=[...])`` mixing rows), merge and unmerge (``safe_merge`` included), ``disable_adapter``
(exactly the base, modules trained whole included), save and load with each tied factor once.

Where PEFT offers no hook, the overrides are these, and only these:

- tying's site wrappers and its container of named banks are registered as virtual subclasses of PEFT's
  ``BaseTunerLayer`` (Python's ``ABC.register``) and carry its small protocol (``active_adapters``,
  ``merged_adapters``, ``disable_adapters``, ...), so PEFT's and transformers' status, merge checks and switches
  (``get_layer_status``, ``get_model_status``, ``get_base_model_state_dict``, ``enable_adapters``) see them;
- ``peft_type`` is a string with PEFT's enum manners (``.value``; ``str()`` gives ``PeftType.TYING``), as PEFT's
  own code reads them.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ..bank import AdapterBanks, MergeRecord
from ..engine import apply_, bank_of, banks, merge_, unapply_, unmerge_
from ..errors import AdapterFileError, NotMergeableError, TyingError, UnsupportedModuleError
from ..serving import adapters
from ..site import SiteAdapter
from ..spec import load_spec
from ..trained import TrainedModule
from ..view import ADAPTERS_ATTR
from .peft_imports import peft_targets

PREFIX = "base_model.model."
# the factors' keys in a saved adapter_model.safetensors: the model's, without the adapter's name (PEFT's rule, which
# transformers' load_adapter undoes by putting the name back after the method's prefix); tying 0.1 wrote tying_bank.
FILE_BANK, OLD_FILE_BANK = f"{ADAPTERS_ATTR}.", "tying_bank."
BASE = "__base__"  # PEFT's name for "the base model" in forward(adapter_names=[...])


class PeftTypeName(str):
    """The method's ``peft_type``: a plain string ``"TYING"`` (so JSON and PEFT's tables take it) with the manners of
    PEFT's enum members that PEFT's own code relies on: ``.value``, and ``str()`` giving ``PeftType.TYING``."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"


PEFT_TYPE = PeftTypeName("TYING")


def _suffix_selectors(names: list[str]) -> list[str]:
    return [rf"re:(?:.*\.)?{re.escape(n)}" for n in names]


@dataclass
class TyingConfig(PeftConfig):
    """A tied adapter as a PEFT config: ``spec`` is a preset name, a YAML path or a dict (tying's spec grammar);
    ``rank``, ``alpha``, ``dropout`` override it; ``target_set`` retargets a preset to a transformers model's
    ``attn_qkv`` / ``attn`` / ``mlp`` / ``all_linear``, ``target_modules`` to PEFT's names or regex;
    ``modules_to_save`` trains modules whole (the spec's ``train_modules``); ``init_weights=False`` starts every
    zero-initialised factor random (the update is not zero at the start: for tests). Once applied, ``spec`` holds
    the resolved spec, so a saved ``adapter_config.json`` rebuilds exactly the same adapter."""

    spec: str | dict[str, Any] = field(default="tl6", metadata={"help": "preset name, YAML path or dict"})
    rank: int | None = field(default=None, metadata={"help": "overrides the spec's rank"})
    alpha: float | None = field(default=None, metadata={"help": "overrides the spec's alpha"})
    dropout: float | None = field(default=None, metadata={"help": "overrides the spec's dropout"})
    target_set: str | None = field(default=None, metadata={"help": "attn_qkv, attn, mlp or all_linear"})
    target_modules: str | list[str] | None = field(default=None, metadata={"help": "PEFT's module names or regex"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained whole"})
    init_weights: bool = field(default=True, metadata={"help": "False: zero-initialised factors start random"})

    def __post_init__(self):
        loaded = self.peft_type is not None  # PEFT passes a saved config's fields back, peft_type among them
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if loaded:  # an adapter folder's config (untrusted): its spec inline or a preset, never a local file
            from .peft import config_spec

            self.spec = config_spec(self.spec)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.tying_spec()  # a bad spec fails here, with the spec's own message

    def tying_spec(self, model=None):
        """The TyingSpec this config describes (retargeted to ``model`` when ``target_set`` is given)."""
        over = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout}
        if self.target_modules is not None:
            over["targets"] = peft_targets(self.target_modules)
        if self.target_set is not None and model is not None:
            from .transformers import targets

            over["targets"] = targets(model, self.target_set)
        if self.modules_to_save:
            over["train_modules"] = _suffix_selectors(self.modules_to_save)
        spec = load_spec(self.spec, **over)
        if self.init_weights:
            return spec
        data = spec.model_dump(mode="json")
        for i, f in enumerate(data["adapter"]["factors"].values()):  # zeros and ones (identity) perturbed, seeded
            if f["init"]["kind"] in ("zeros", "ones"):
                mean = 0.0 if f["init"]["kind"] == "zeros" else 1.0
                f["init"] = {"kind": "normal", "mean": mean, "std": 0.1, "seed": 1000 + i}
        return load_spec(data)


class TyingTuner(BaseTuner):
    """The tuner PEFT calls for a TyingConfig: each PEFT adapter is a named tying adapter on the model."""

    prefix = "tying_"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: ClassVar[dict] = {}

    # ---- adding and removing adapters ------------------------------------------------------------------------
    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                       state_dict=None):
        config = self.peft_config[adapter_name]
        spec = config.tying_spec(model)
        try:  # every check first: a refusal leaves the model as it was; loading fills meta factors (PEFT's rule)
            apply_(model, spec, name=adapter_name, device="meta" if low_cpu_mem_usage else None)
        except UnsupportedModuleError as e:  # in the words PEFT users know
            raise UnsupportedModuleError(f"Target module type is not supported: {e}") from None
        bank = bank_of(model, adapter_name)
        self.targeted_module_names = sorted({*self.targeted_module_names, *(s.name for s in bank.plan.sites)})
        # what adapter_config.json records: the exact spec, so that loading rebuilds this adapter
        config.spec = spec.model_dump(mode="json", exclude_defaults=True)
        config.rank = config.alpha = config.dropout = config.target_set = config.target_modules = None
        config.modules_to_save, config.init_weights = None, True
        active = bank.state.active = adapter_name in self.active_adapters
        self._train(adapter_name, active and not config.inference_mode)

    def _train(self, adapter_name: str, train: bool) -> None:
        """Each factor of the adapter trains as its spec says (``train``), or none does; so do its train_modules."""
        bank = bank_of(self.model, adapter_name)
        trains = {f"{g.factor}.{g.key}": g.train for g in bank.plan.groups}  # the trained modules' copies: all
        for name, p in bank.named_parameters():
            p.requires_grad_(train and trains.get(name, True))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if bank_of(self.model, adapter_name).state.merged:  # PEFT's words
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        unapply_(self.model, name=adapter_name)
        del self.peft_config[adapter_name]
        self.targeted_module_names = sorted({s.name for b in banks(self.model).values() for s in b.plan.sites})
        left = [n for n in self.active_adapters if n != adapter_name]
        if not left and self.peft_config:
            left = [next(iter(self.peft_config))]
        self.active_adapter = left[0] if len(left) == 1 else left
        if left:
            self.set_adapter(left)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]} not found; this model holds {list(self.peft_config)}")
        trained = [m for n in names for m in bank_of(self.model, n).plan.train_modules]
        if len(trained) != len(set(trained)):  # a module trained whole has no sum of two versions (PEFT's words)
            raise ValueError(f"Only one adapter can be set at a time for ModulesToSaveWrapper (here: modules that "
                             f"several of {names} train whole: {sorted({m for m in trained if trained.count(m) > 1})})")
        for n, bank in banks(self.model).items():
            if n not in names and bank.state.merged:
                unmerge_(self.model, name=n)
            bank.state.active = n in names
            self._train(n, n in names and not inference_mode)
        self.active_adapter = adapter_name

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's convert_to_lora reads LoRA layers' internals; a tying adapter exports to an exact PEFT LoRA with
        tying.integrations.peft.export_peft instead."""
        return False

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        for n in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if n not in self.peft_config:
                raise ValueError(f"Adapter {n} not found; this model holds {list(self.peft_config)}")
            self._train(n, requires_grad)

    # ---- what PEFT's per-module injection would do: tying applies the whole spec ------------------------------
    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError("tying applies a whole spec at once (inject_adapter)")

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return False

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _mark_only_adapters_as_trainable(self, model):
        pass  # tying.apply_ froze the base (spec.freeze_base) and set each factor's own train flag

    def _cast_adapter_dtype(self, adapter_name, autocast_adapter_dtype=True):
        if autocast_adapter_dtype:  # as PEFT: half-precision factors (and copies of modules trained whole, which
            for p in bank_of(self.model, adapter_name).parameters():  # cast their inputs) train in float32
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()

    # ---- forward, merge, disable, unload ----------------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
            return
        beams = kwargs.get("num_beams") or 1  # generate() runs num_beams rows per input, as PEFT repeats the names
        names = [n for n in names for _ in range(beams)]
        if any(b.state.merged for b in banks(self.model).values()):
            raise ValueError("adapter_names cannot mix rows while an adapter is merged; unmerge it first")
        with adapters(self.model, [None if n == BASE else n for n in names]):
            yield

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        todo = [n for n in adapter_names or self.active_adapters if not bank_of(self.model, n).state.merged]
        if not todo:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
        for n in todo:
            self._merge(n, safe_merge)

    def _merge(self, name: str, safe: bool) -> None:
        try:
            merge_(self.model, name=name, safe=safe)
        except NotMergeableError as e:  # a safe merge's refusal in PEFT's words (NaNs detected, a ValueError)
            if safe and "NaN or infinite" in str(e):
                raise ValueError(f"NaNs detected in the merged weights: {e}") from None
            raise

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Switch every site and module the adapters train whole (PEFT's disable/enable_adapter_layers). Merged
        adapters are unmerged first (as PEFT's layers do), so that a disabled model is the base."""
        if not enabled:
            self.unmerge_adapter()
        for module in self.model.modules():
            if isinstance(module, (SiteAdapter, TrainedModule, AdapterBanks)):
                module.disabled = not enabled

    def unmerge_adapter(self) -> None:
        for n, bank in banks(self.model).items():
            if bank.state.merged:
                unmerge_(self.model, name=n)


    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names=None):
        names = list(adapter_names or self.active_adapters) if merge else []
        if merge:  # every merge first (each checked), then nothing can fail
            for n in names:
                if not bank_of(self.model, n).state.merged:
                    self._merge(n, safe_merge)
        for n in list(banks(self.model)):
            unapply_(self.model, merge=n in names, name=n)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        return self._unload(True, safe_merge, adapter_names)

    def unload(self):
        return self._unload(False)

    # ---- saving and loading: each tied factor once, under the file keys of a one-adapter model ---------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        ours = f"{ADAPTERS_ATTR}.{adapter_name}."
        out = {}
        for k, v in state_dict.items():
            head, _, tail = k.partition(ours)
            if tail and (not head or head.endswith(".")) and tail not in MergeRecord.KEYS:  # the merge record: the model's
                out[f"{head}{FILE_BANK}{tail}"] = v
        return out  # the factors and the copies of modules trained whole (as PEFT keeps modules_to_save)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # the file keys carry no adapter name already

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """The checkpoint's factors must be exactly the adapter's (PEFT itself only warns about missing keys, which
        would leave a freshly initialised adapter), finite, of the same shapes; a refused load takes the adapter off
        again, so the model is as it was."""
        tuner = _tuner(model)
        bank = bank_of(tuner.model, adapter_name)
        head = PREFIX if any(k.startswith(PREFIX) for k, _ in model.named_parameters()) else ""
        want = {f"{FILE_BANK}{k}": v for k, v in bank.state_dict().items()}
        state_dict = {k.removeprefix(PREFIX).replace(OLD_FILE_BANK, FILE_BANK, 1): v for k, v in state_dict.items()}
        got = {k: v for k, v in state_dict.items() if k.startswith(FILE_BANK)}
        other = {k: v for k, v in state_dict.items() if not k.startswith(FILE_BANK)}  # e.g. embeddings PEFT saved
        try:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            wrong = [f"{k}: file {tuple(got[k].shape)} vs model {tuple(want[k].shape)}" for k in set(want) & set(got)
                     if got[k].shape != want[k].shape]
            if missing or extra or wrong:
                raise AdapterFileError(f"this tied PEFT adapter does not fit the model (was it saved from another "
                                       f"architecture?): missing {missing[:3]}, unexpected {extra[:3]}, shapes "
                                       f"{wrong[:3]}")
            bad = [k for k, v in {**got, **other}.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise AdapterFileError(f"this tied PEFT adapter holds NaN or infinite values in {bad[:3]}")
        except AdapterFileError:
            tuner.peft_config.pop(adapter_name, None)
            unapply_(tuner.model, name=adapter_name)
            if not banks(tuner.model) and hasattr(tuner.model, "peft_config"):
                del tuner.model.peft_config  # what PEFT put on the model, as it was
            raise
        out = {f"{head}{ADAPTERS_ATTR}.{adapter_name}.{k.removeprefix(FILE_BANK)}": v for k, v in got.items()}
        out.update({f"{head}{k}": v for k, v in other.items()})
        return out


def _tuner(model) -> TyingTuner:
    """The TyingTuner of a PeftModel, or of a model PEFT injected into directly (transformers' load_adapter)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, TyingTuner):
        return base
    for m in model.modules():
        if isinstance(m, TyingTuner):
            return m
    return _Bare(model)


class _Bare:
    """A model that carries tying adapters without a tuner object in it (transformers' injection keeps none)."""

    def __init__(self, model):
        self.model = model
        self.peft_config = getattr(model, "peft_config", {})


def register() -> bool:
    """Teach PEFT the TYING method (config, tuner, prefix) and PEFT's layer protocol tying's wrappers; False
    (nothing done) on PEFT older than 0.21."""
    from importlib.metadata import version

    if tuple(int(p) for p in re.findall(r"\d+", version("peft"))[:2]) < MIN_PEFT:
        return False
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = TyingConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = TyingTuner
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = TyingTuner.prefix
    for cls in (SiteAdapter, TrainedModule, AdapterBanks):
        BaseTunerLayer.register(cls)
    return True


MIN_PEFT = (0, 21)
__all__ = ["PEFT_TYPE", "TyingConfig", "TyingTuner", "peft_targets", "register"]
_ = TyingError  # re-exported for the error docs

register()  # importing this module is enough: PEFT then knows the method
