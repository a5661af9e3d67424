"""Trainable parameters of every preset on the paper's two base models (LLaMA-2 7B, GPT-2B-001),
counted by the engine on meta-device models (no weights allocated), at ranks 2-128.

    python benchmarks/paper_params.py [--out benchmarks/results]

Writes paper_params.json and paper_params.md (trainable count and percent of LoRA at the same rank): the same bytes on
every run (the time taken is printed, not written), so rerunning it leaves the committed results unchanged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tying.integrations.meta_models import meta_model

import tying

MODELS = ["llama2-7b", "gpt-2b-001"]
RANKS = [2, 8, 16, 32, 64, 128]
ORDER = ["lora", "vera", "tl5", "tl6", "tied-Auv", "tied-Buv", "tied-ABu", "tied-ABv", "tied-v"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for name in MODELS:
        model = meta_model(name)
        for rank in RANKS:
            lora = tying.count(model, "lora", rank=rank).trainable
            for preset in ORDER:
                c = tying.count(model, preset, rank=rank)
                rows.append({"model": name, "rank": rank, "preset": preset, "trainable": c.trainable,
                             "frozen": c.frozen, "percent_of_lora": round(100 * c.trainable / lora, 2)})
    seconds = time.perf_counter() - t0
    (out / "paper_params.json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = []
    for name in MODELS:
        lines += [f"### {name}: trainable adapter parameters (percent of LoRA at the same rank)", "",
                  "| preset | " + " | ".join(f"r={r}" for r in RANKS) + " |", "|---" * (len(RANKS) + 1) + "|"]
        for preset in ORDER:
            cells = [r for r in rows if r["model"] == name and r["preset"] == preset]
            lines.append(f"| {preset} | " + " | ".join(
                f"{c['trainable']:,}" + ("" if preset == "lora" else f" ({c['percent_of_lora']:.1f} %)") for c in cells) + " |")
        lines.append("")
    (out / "paper_params.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"{len(rows)} counts in {seconds:.2f} s on meta-device models; wrote {out}/paper_params.{{json,md}}")


if __name__ == "__main__":
    main()
