"""tying: tie and selectively train adapter factors across layers and modules of any PyTorch model.

    spec = tying.load_spec("tl6", rank=8)   # preset name, YAML path or dict
    plan = tying.plan(model, spec)          # pure; plan.summary() is a readable table
    counts = tying.apply_(model, spec)      # in place
    tying.merge_(model); tying.unmerge_(model); tying.unapply_(model, merge=False)
    tying.save_adapter(model, "out/"); tying.load_adapter(model, "out/")
    tying.materialize_(model)  # applied on the meta device: values once the base is loaded (docs/huggingface.md)
    tying.load_adapters_(model, {"a": "out/"}); with tying.adapters(model, ["a", None]): ...  # mixed batches
    tying.register_kind(...); tying.register_module_type(...)   # extend: docs/extending.md
    spec with tasks: [a, b]; with tying.adapters(model, ["a", "b"]): ...  # one adapter, many tasks: docs/multitask.md

Layers, from the bottom: vocab (names and facts, no torch) -> spec -> module types and the update's math -> plan
-> bank (the factors and the adapter's state) -> meta, shared down projection, site wrappers and kinds -> merging
-> engine -> task_files (one task out of a multi-task file) -> state -> serving.
"""

import _tying_bridges

from . import errors, vocab
from .bank import BankState, MergeRecord
from .count import count
from .engine import adapters_disabled, apply_, bank_of, merge_, unapply_, unmerge_
from .kinds import Kind, register_kind, unregister_kind
from .meta import materialize_
from .modtypes import ModuleType, register_module_type, unregister_module_type
from .planner import Counts, Plan, plan
from .serving import adapters, load_adapters_, unload_adapter_
from .spec import TyingSpec, load_spec, preset_names
from .state import load_adapter, merge_record, save_adapter

_tying_bridges.autoload()  # PEFT learns the TYING method on its import (also done at start-up: tying-bridges.pth)

__version__ = "0.1.0"

__all__ = ["BankState", "Counts", "Kind", "MergeRecord", "ModuleType", "Plan", "TyingSpec", "__version__", "adapters", "adapters_disabled", "apply_", "bank_of",
           "count", "errors", "load_adapter", "load_adapters_", "load_spec", "materialize_", "merge_", "merge_record", "plan", "preset_names",
           "register_kind", "register_module_type", "save_adapter", "unapply_", "unload_adapter_", "unmerge_",
           "unregister_kind", "unregister_module_type", "vocab"]
