"""Issue 37.5, the pool family side by side at equal trainable budgets (docs/pools.md, "Side by side").

    python benchmarks/pools.py configs   # write benchmarks/configs/pools/*.yaml (our specs, PEFT's configs); counts
    python benchmarks/reproduce.py benchmarks/configs/pools.yaml          # the parts (resumable; shard=K/N)
    python benchmarks/pools.py report    # pools.{json,md,png}: each budget's table, intervals, verdicts

The run itself is the LLM kit's (benchmarks/configs/pools.yaml); this script only writes the per-budget config files
(each method's knobs set to meet a budget, counted on SmolLM2-135M's meta-device twin) and reads the kit's
``reproduce.json`` back into a table per budget, which the kit's report (same rank = same budget) cannot give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs" / "pools"
RESULTS = ROOT / "benchmarks" / "results" / "pools"
MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj"]

# budget -> method -> (preset or PEFT type, rank, knobs); presets without knobs run by name (lora, tl6, vera)
BUDGETS = {
    "40k": {"lora": ("lora", 1, {}), "tl6": ("tl6", 8, {}), "vera": ("vera", 192, {}),
            "lily": ("lily", 5, {"stride_a": 15, "num_b": 4}),
            "vb-lora": ("vb-lora", 2, {"num_vectors": 16}),
            "mos": ("mos", 8, {"shards": 30}),
            "peft-lily": ("LILY", 5, {"stride_A": 15, "num_B": 4}),
            "peft-vb-lora": ("VBLORA", 2, {"num_vectors": 16, "vector_length": 64})},
    "370k": {"lora": ("lora", 8, {}), "tl6": ("tl6", 192, {}),
             "lily": ("lily", 32, {"stride_a": 6, "num_b": 3}),
             "vb-lora": ("vb-lora", 1, {"num_vectors": 280}),
             "mos": ("mos", 8, {"shards": 275}),
             "hydralora": ("hydralora", 2, {"heads": 2}),
             "peft-lily": ("LILY", 32, {"stride_A": 6, "num_B": 3}),
             "peft-vb-lora": ("VBLORA", 1, {"num_vectors": 280, "vector_length": 64})},
}
NOT_RUN = {  # method -> budget -> why (the closest it gets, counted like the rest)
    "vera": {"370k": "the VeRA-like setting trains u and v only: 30 x (960 + r) grows by 30 per rank and r <= 192 "
                     "(k/v are 192 wide), so at most 34,560"},
    "hydralora": {"40k": "a site's own A and a router on its input cost at least 3L(rd + 2dr + 2d) = 213,120 at "
                         "rank 1 with 2 heads"},
}
PAIRS = [("lily", "peft-lily"), ("vb-lora", "peft-vb-lora")]  # ours against PEFT's own, same knobs


def config_name(method: str, budget: str) -> str:
    """The kit's config for a cell: a preset name, or a file under benchmarks/configs/pools/."""
    preset, _, knobs = BUDGETS[budget][method]
    return preset if not knobs else f"benchmarks/configs/pools/{method}-{budget}.yaml"


def write_configs() -> dict:
    """Write the knob-carrying configs (ours: specs on SmolLM2's q/k/v; PEFT's: ``peft:`` files); the counts."""
    from tying.integrations import transformers as tx
    from tying.integrations.llm.parts import trainable_of
    from tying.integrations.meta_models import meta_model

    CONFIGS.mkdir(parents=True, exist_ok=True)
    model, counts = meta_model(MODEL), {}
    for budget, methods in BUDGETS.items():
        for method, (preset, rank, knobs) in methods.items():
            name = config_name(method, budget)
            if knobs:
                head = (f"# issue 37.5, budget {budget}: {method} (written by benchmarks/pools.py configs)\n")
                if method.startswith("peft-"):
                    text = yaml.safe_dump({"peft": {"peft_type": preset, "r": rank, **knobs,
                                                    "target_modules": TARGETS}}, sort_keys=False)
                else:
                    text = tx.spec(model, preset, rank=rank, **knobs).to_yaml()
                (ROOT / name).write_text(head + text)
            counts[budget, method] = trainable_of(model, str(ROOT / name) if knobs else name, rank)
            print(f"{budget} {method}: {name} rank {rank}: {counts[budget, method]:,} trainable")
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["configs", "report"])
    p.add_argument("--out", default="benchmarks/results/pools/run", help="the kit's out folder (pools.yaml's)")
    a = p.parse_args(argv)
    if a.what == "configs":
        write_configs()
    else:
        report(Path(a.out))


if __name__ == "__main__":
    sys.exit(main())
