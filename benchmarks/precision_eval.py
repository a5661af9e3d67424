"""Score the adapters of the precision check (the quick job run with a float32 and a bfloat16 base) on a larger SNLI
test set, so that the float32 / bfloat16 comparison is not decided by 60 examples.

    python benchmarks/reproduce.py benchmarks/configs/quick.yaml model.dtype=float32 threads=1 \
        out=benchmarks/results/reproduce-precision/float32
    python benchmarks/reproduce.py benchmarks/configs/quick.yaml model.dtype=bfloat16 threads=1 \
        out=benchmarks/results/reproduce-precision/bfloat16
    python benchmarks/precision_eval.py --dtype float32 --n-test 300     # each precision in its own process
    python benchmarks/precision_eval.py --dtype bfloat16 --n-test 300
    python benchmarks/precision_eval.py                                  # only rewrite precision.md

Each adapter is evaluated on a base in the precision it was trained in. The test set is the fixed SNLI
test draw (seed 0); its first 60 examples are the quick job's. Writes ``<dir>/eval-<dtype>.json`` and,
when both exist, ``<dir>/precision.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tying.integrations.llm.models import BUILTIN, load_model
from tying.integrations.llm.parts import evaluate as score
from tying.integrations.llm.tasks import get_task

import tying


def half_width(p: float, n: int) -> float:
    """Half-width of a 95 % normal interval of an accuracy ``p`` (0-1) on ``n`` examples, in points."""
    return 100 * 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / n)


def evaluate(args, root: Path) -> None:
    """Score zero-shot and each config's adapter on ``args.n_test`` test examples; writes eval-<dtype>.json."""
    task = get_task("nli")
    _, test = task.load(n_train=1, n_test=args.n_test, seed=0)
    rows = []
    for config in ["zero-shot", *args.configs]:
        model, tok = load_model("smollm2-135m", dtype=args.dtype)
        if config != "zero-shot":
            tying.load_adapter(model, root / args.dtype / "adapters" / f"nli-{config}-r8-s0")
        m = score(model, tok, task, test)
        rows.append({"config": config, "dtype": args.dtype, "accuracy": m["accuracy"], "n": m["n"],
                     "ci95": half_width(m["accuracy"] / 100, m["n"])})
        print(rows[-1], flush=True)
    (root / f"eval-{args.dtype}.json").write_text(json.dumps({"model": BUILTIN["smollm2-135m"], "rows": rows}, indent=1))


def write_report(root: Path) -> None:
    """precision.md from eval-float32.json, eval-bfloat16.json and the runs' reproduce.json, once both exist."""
    done = {d: json.loads((root / f"eval-{d}.json").read_text())["rows"] for d in ("float32", "bfloat16")
            if (root / f"eval-{d}.json").exists()}
    if len(done) < 2:
        return
    q = {d: {r["config"]: r for r in json.loads((root / d / "reproduce.json").read_text())["rows"]} for d in done}
    n = done["float32"][0]["n"]
    lines = [(f"Precision check: {BUILTIN['smollm2-135m']}, SNLI, the quick job's training (30 steps x 4, 120 "
              "examples, seed 0, --threads 1, the two precisions side by side on a 2-core CPU); base in float32 or "
              "bfloat16, adapter factors float32 in both. Accuracy on the quick job's 60 test examples and on "
              f"{n} (the same fixed draw, first 60 included), with a 95 % interval. The runs' tokens/s were measured "
              "side by side with other work on the machine; for speed see benchmarks/results/llm-step."),
             "",
             f"| config | fp32 (60) | bf16 (60) | fp32 ({n}) | bf16 ({n}) | run tokens/s fp32 | bf16 |",
             "|---|---|---|---|---|---|---|"]
    for a, b in zip(done["float32"], done["bfloat16"]):
        qa, qb = q["float32"][a["config"]], q["bfloat16"][b["config"]]
        speed = [f"{r['tokens'] / r['seconds']:.0f}" if r.get("tokens") else "—" for r in (qa, qb)]
        lines.append(f"| {a['config']} | {qa['score']:.1f} | {qb['score']:.1f} | {a['accuracy']:.1f} ± {a['ci95']:.1f} "
                     f"| {b['accuracy']:.1f} ± {b['ci95']:.1f} | {speed[0]} | {speed[1]} |")
    (root / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="evaluate this precision's adapters")
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--configs", nargs="+", default=["lora", "tl6", "vera"])
    ap.add_argument("--dir", default="benchmarks/results/reproduce-precision")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.dtype:
        evaluate(args, Path(args.dir))
    write_report(Path(args.dir))


if __name__ == "__main__":
    main()
