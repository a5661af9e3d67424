"""TyingConfig rows for PEFT's own test matrix (its tests/test_custom_models.py); run.py patches them in.

Rows: untied and tied across layers; LoRA, IA3, DoRA; Linear, Conv2d, Embedding and transformers' Conv1D sites,
with and without modules trained whole (PEFT's modules_to_save). ``EXPECTED`` lists the tests that assume LoRA's own
internals by name, each with the reason; docs/integrations-peft.md quotes them.
"""

from __future__ import annotations

import torch
from torch import nn
from tying.integrations.peft import TyingConfig


class TyingStack(nn.Module):
    """Three equal blocks of two Linear layers (10 -> 10), then a head: factors tie across layers."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"lin0": nn.Linear(10, 10), "lin1": nn.Linear(10, 10)})
                                    for _ in range(layers))
        self.out = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        for block in self.layers:
            X = block["lin1"](torch.relu(block["lin0"](X)))
        return self.sm(self.out(X))


MODELS = {"TyingStack": TyingStack}


def _spec(**factors) -> dict:
    """A spec with the given factors (targets come from target_modules)."""
    return {"adapter": {"rank": 2, "factors": factors}}


UNTIED = _spec(A={"init": "kaiming_uniform"}, B={"init": "zeros"})
TIED_U = _spec(A={"init": "kaiming_uniform"}, B={"init": "zeros"}, u={"tie": "all", "init": "ones"})  # lin0, lin1
EMB = {"adapter": {"rank": 4, "alpha": 16, "factors": {  # PEFT's embedding init: A zero, B random
    "A": {"init": "zeros"}, "B": {"init": {"kind": "normal", "std": 1.0, "seed": 0}}}}}
IA3 = {"adapter": {"kind": "ia3", "rank": 1, "factors": {"v": {"init": "ones"}}}}
DORA = {"adapter": {"kind": "dora", "rank": 2, "factors": {"A": {"init": "kaiming_uniform"}, "B": {"init": "zeros"},
                                                            "m": {"init": "ones"}}}}

TYING_CASES = [
    ("Tying MLP lora lin0", "MLP", TyingConfig, {"spec": UNTIED, "target_modules": ["lin0"]}),
    ("Tying MLP lora regex", "MLP", TyingConfig, {"spec": UNTIED, "target_modules": "lin0"}),
    ("Tying MLP lora both", "MLP", TyingConfig, {"spec": UNTIED, "target_modules": ["lin0", "lin1"]}),
    ("Tying MLP u tied across modules", "MLP", TyingConfig, {"spec": TIED_U, "target_modules": ["lin0", "lin1"]}),
    ("Tying MLP modules_to_save", "MLP", TyingConfig,
     {"spec": UNTIED, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Tying MLP ia3", "MLP", TyingConfig, {"spec": IA3, "target_modules": ["lin0", "lin1"]}),
    ("Tying MLP dora", "MLP", TyingConfig, {"spec": DORA, "target_modules": ["lin0"]}),
    ("Tying Stack tl6", "TyingStack", TyingConfig, {"spec": "tl6", "rank": 2, "target_modules": ["lin0", "lin1"]}),
    ("Tying Stack vera", "TyingStack", TyingConfig, {"spec": "vera", "rank": 2, "target_modules": ["lin0", "lin1"]}),
    ("Tying Stack tl5 modules_to_save", "TyingStack", TyingConfig,
     {"spec": "tl5", "rank": 2, "target_modules": ["lin0", "lin1"], "modules_to_save": ["out"]}),
    ("Tying Conv2d lora", "Conv2d", TyingConfig, {"spec": UNTIED, "target_modules": ["conv2d"]}),
    ("Tying Conv2d ia3", "Conv2d", TyingConfig, {"spec": IA3, "target_modules": ["conv2d"]}),
    ("Tying Emb lora", "EmbConv1D", TyingConfig, {"spec": EMB, "target_modules": ["emb"]}),
    ("Tying Conv1D lora", "EmbConv1D", TyingConfig, {"spec": UNTIED, "rank": 1, "target_modules": ["conv1d"]}),
]

TYING_MULTI_CASES = [
    ("Tying Same", "tying", TyingConfig, {"spec": UNTIED, "target_modules": ["lin0"], "init_weights": False},
     {"spec": UNTIED, "target_modules": ["lin0"], "init_weights": False}),
    ("Tying Different", "tying", TyingConfig, {"spec": UNTIED, "target_modules": ["lin0"], "init_weights": False},
     {"spec": UNTIED, "target_modules": ["lin1"], "init_weights": False}),
]

# test name (without its parameters) -> why it cannot pass for a method other than LoRA. Checked by run.py: a test
# listed here that passes is reported, so the list stays true.
EXPECTED: dict[str, str] = {}
