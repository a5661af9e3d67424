"""The whole-step goal over several runs of benchmarks/speed.py: per run, each adapter's whole-step overhead over the
frozen floor as a ratio to PEFT LoRA's, its median and 95 % bootstrap interval, and a verdict against the goal.

    python benchmarks/speed_runs.py benchmarks/results/speed-whole/run{2,3,4}.json [--name runs]

Verdict per run: "met" when the interval lies at or below the goal, "missed" when it lies above it, "undecided"
when it holds the goal (the repetitions cannot tell). Writes ``<folder of the first run>/<name>.md`` and
``<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tying.files import write_text

GOALS = {("train", "tying-lora"): 0.5, ("train", "tying-tl6"): 0.6,
         ("inference", "tying-lora"): 0.5, ("inference", "tying-tl6"): 0.5}


def verdict(lo: float, hi: float, goal: float) -> str:
    return "met" if hi <= goal else "missed" if lo > goal else "undecided"


def rows(runs: dict[str, dict]) -> list[dict]:
    """One row per (shape, step, contender) with each run's median, interval and verdict."""
    out = []
    first = next(iter(runs.values()))
    for table in first:
        step, _, shape = table.partition(" ")
        if step not in ("train", "inference"):
            continue
        for (kind, who), goal in GOALS.items():
            if kind != step or who not in first[table]:
                continue
            per = {}
            for name, run in runs.items():
                r = run[table][who]["overhead_vs_peft"]
                per[name] = {"median": r["median"], "lo": r["ci95"][0], "hi": r["ci95"][1],
                             "verdict": verdict(r["ci95"][0], r["ci95"][1], goal)}
            meds = [p["median"] for p in per.values()]
            out.append({"shape": shape, "step": step, "contender": who, "goal": goal, "runs": per,
                        "median": {"min": min(meds), "median": statistics.median(meds), "max": max(meds)}})
    return out


def markdown(found: list[dict], runs: dict[str, dict]) -> str:
    names = list(runs)
    s = next(iter(runs.values()))["settings"]
    lines = [(f"Whole-step overhead over the frozen floor / PEFT LoRA's, median [95 % bootstrap interval] per run "
             f"({', '.join(names)}; {s['reps']} alternated repetitions, {s['batch']} x {s['seq']} tokens, rank "
             f"{s['rank']}, {s['threads']} thread(s)); the medians' min / median / max over the runs; verdict per run."),
             "", f"| shape | step | contender | goal | {' | '.join(names)} | min / median / max | verdicts |",
             "|---|---|---|---:|" + "---:|" * len(names) + "---:|---|"]
    for r in found:
        cells = [f"{p['median']:.2f}x [{p['lo']:.2f}, {p['hi']:.2f}]" for p in r["runs"].values()]
        m = r["median"]
        lines.append(f"| {r['shape']} | {r['step']} | {r['contender']} | {r['goal']}x | {' | '.join(cells)} | "
                     f"{m['min']:.2f} / {m['median']:.2f} / {m['max']:.2f} | "
                     f"{', '.join(p['verdict'] for p in r['runs'].values())} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="JSON files of benchmarks/speed.py, one per run")
    ap.add_argument("--name", default="runs", help="output file stem, beside the first run")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_file()]
    if missing:
        ap.error(f"no such run file: {', '.join(missing)}")
    runs = {p.stem: json.loads(p.read_text()) for p in args.runs}
    found = rows(runs)
    if not found:
        ap.error("the runs hold no whole-step tables (run benchmarks/speed.py without --no-whole)")
    out = args.runs[0].parent
    write_text(out / f"{args.name}.json", json.dumps(found, indent=1))
    text = markdown(found, runs)
    write_text(out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
