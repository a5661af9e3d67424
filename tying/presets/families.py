"""Presets with knobs: the pool family (Lily, VB-LoRA, MoS, HydraLoRA, MTL-LoRA) written as specs (docs/pools.md).

``tying.load_spec("lily", rank=16, stride_a=2, num_b=4)``: each builder takes its papers' knobs (and ``rank``),
defaults as in PEFT where PEFT has the method, and returns the spec as a dict on the usual q/k/v targets
(``presets.yaml``'s). Counts equal PEFT's LilyConfig / VBLoRAConfig at the same settings (tests/test_pools.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _kaiming(seed: int) -> dict:
    return {"kind": "kaiming_uniform", "seed": seed}


def lily(rank: int = 32, stride_a: int = 1, num_b: int = 2, scaling: float = 1.0) -> dict:
    """Lily (ACL'25, PEFT's LilyConfig): A shared by ``stride_a`` consecutive layers (per projection), a pool of
    ``num_b`` B entries shared by every layer (per projection), and per site a router on the down projection whose
    softmax, averaged over the batch's tokens, mixes the pool; the update is ``scaling * B_mix A x``."""
    a = {"tie": [{"capture": "layer", "every": stride_a}], "init": _kaiming(0)}
    return {"adapter": {"rank": rank, "alpha": scaling * rank,
                        "pools": {"Bs": {"size": num_b, "tie": ["layer"], "init": "zeros"}},
                        "factors": {"A": a, "B": {"pool": "Bs", "mix": "router", "router": "down", "reduce": "batch",
                                                  "tie": [], "init": _kaiming(1)}}}}


def vb_lora(rank: int = 4, num_vectors: int = 256, vector_length: int = 64, topk: int = 2,
            init_bound: float = 0.02, init_logits_std: float = 0.1) -> dict:
    """VB-LoRA (NeurIPS'24, PEFT's VBLoRAConfig): one bank of ``num_vectors`` vectors of ``vector_length`` for the
    whole model; every A and B is assembled from vectors, each the softmax mix of the ``topk`` bank vectors its own
    logits rank highest. (PEFT's default length is 256; 64 divides more model widths: every width must be a
    multiple of it.)"""
    logits = {"tie": [], "init": {"kind": "normal", "std": init_logits_std, "seed": 1}}
    return {"adapter": {"rank": rank,
                        "pools": {"bank": {"size": num_vectors, "entry": vector_length, "tie": "all",
                                           "init": {"kind": "uniform", "bound": init_bound, "seed": 0}}},
                        "factors": {"A": {**logits, "pool": "bank", "mix": "topk", "k": topk},
                                    "B": {**logits, "pool": "bank", "mix": "topk", "k": topk}}}}


def mos(rank: int = 8, shards: int = 64) -> dict:
    """Mixture of Shards (ICLR'25), subset selection: global pools of ``shards`` row shards for A and column shards
    for B (one pool per width); each site's A rows and B columns are shards chosen by fixed random indices (top-1 of
    frozen random logits). B's shards start at zero, so the update does. (MoS's private shards and pair dissociation
    are left out: a simpler member of the family.)"""
    pick = {"tie": [], "train": False, "mix": "topk", "k": 1, "init": {"kind": "normal", "seed": 2}}
    return {"adapter": {"rank": rank,
                        "pools": {"As": {"size": shards, "entry": "width", "tie": "all", "shape_aware": True,
                                         "init": {"kind": "uniform", "bound": 1 / math.sqrt(shards), "seed": 0}},
                                  "Bs": {"size": shards, "entry": "width", "tie": "all", "shape_aware": True,
                                         "init": "zeros"}},
                        "factors": {"A": {**pick, "pool": "As"}, "B": {**pick, "pool": "Bs"}}}}


def hydralora(rank: int = 8, heads: int = 3) -> dict:
    """HydraLoRA (NeurIPS'24): per site one A and ``heads`` B heads (a pool of the site's own, starting at zero),
    mixed per token by a router on the site's input."""
    return {"adapter": {"rank": rank,
                        "pools": {"Bs": {"size": heads, "tie": [], "init": "zeros"}},
                        "factors": {"A": {"tie": [], "init": _kaiming(0)},
                                    "B": {"pool": "Bs", "mix": "router", "router": "input", "reduce": "token",
                                          "tie": [], "init": _kaiming(1)}}}}


def mtl_lora(tasks: list[str], rank: int = 8, heads: int = 2) -> dict:
    """MTL-LoRA (AAAI'25): per site an A shared by every task, a per-task scaling of the rank space (u), and
    ``heads`` B heads shared by the tasks, mixed by per-task trained weights. Needs ``tasks``."""
    return {"tasks": tasks,
            "adapter": {"rank": rank,
                        "pools": {"Bs": {"size": heads, "tie": ["task"], "init": "zeros"}},
                        "factors": {"A": {"tie": ["task"], "init": _kaiming(0)},
                                    "u": {"tie": [], "init": "ones"},
                                    "B": {"pool": "Bs", "mix": "weights", "tie": [], "init": "zeros"}}}}


FAMILIES: dict[str, Callable[..., dict]] = {"lily": lily, "vb-lora": vb_lora, "mos": mos, "hydralora": hydralora,
                                            "mtl-lora": mtl_lora}
