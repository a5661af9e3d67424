"""Issue 37.5, the pool family side by side at equal trainable budgets (docs/pools.md, "Side by side").

    python benchmarks/pools.py configs   # write benchmarks/configs/pools/*.yaml (our specs, PEFT's configs); counts
    python benchmarks/pools.py task nli --sweep > pools-nli-sweep.yaml   # pools.yaml on SNLI alone, with the sweep
    python benchmarks/reproduce.py pools-nli-sweep.yaml stage=sweep       # every method and budget at 1e-2, 3e-2
    python benchmarks/pools.py table     # benchmarks/configs/rates/pools.yaml: the sweep's pick per method and budget
    python benchmarks/pools.py task nli > pools-nli.yaml                  # and squad: one task at a time
    python benchmarks/reproduce.py pools-nli.yaml stage=train             # the parts (resumable; shard=K/N)
    python benchmarks/pools.py report    # pools.{json,md,png}: each budget's table, intervals, verdicts

The run itself is the LLM kit's (benchmarks/configs/pools.yaml); this script only writes the per-budget config files
(each method's knobs set to meet a budget, counted on SmolLM2-135M's meta-device twin) and reads the kit's
``reproduce.json`` back into a table per budget, which the kit's report (same rank = same budget) cannot give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml
from tying.integrations.llm.report import compare
from tying.integrations.llm.stats import MARGIN, paired_bootstrap, verdict

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
    "hydralora": {"40k": "each site's own A, its heads' B's and a router of heads x d_in on its input cost at least "
                         "213,120 (rank 1, 2 heads)"},
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


def cell_of(row: dict) -> tuple[str, str] | None:
    """(budget, method) of a finished part, by its config and rank; None for zero-shot."""
    for budget, methods in BUDGETS.items():
        for method, (_, rank, _) in methods.items():
            if Path(config_name(method, budget)).stem == Path(row["config"]).stem and rank == row["rank"]:
                return budget, method
    return None


def mean_interval(by_seed: dict[int, list[float]]) -> tuple[float, float, float]:
    """Mean over seeds and examples with a 95 % bootstrap interval (test examples resampled, paired by seed)."""
    runs = list(by_seed.values())
    return paired_bootstrap(runs, [[0.0] * len(r) for r in runs])


def claim(a: dict, b: dict, margin: float = 0.0) -> tuple[str, str]:
    """(a - b [95 % CI], the verdict on "a >= b - margin") over the seeds both have."""
    got = compare(a, b)
    if got is None:
        return "—", "—"
    d, lo, hi = got
    return f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]", verdict(lo, hi, margin)


def agreement(a: dict, b: dict) -> tuple[str, str]:
    """Ours against PEFT's: the difference and whether they agree within 10 % of PEFT's mean either way
    (both one-sided claims supported: supported; either refuted: refuted; else undecided at this scale)."""
    got = compare(a, b)
    if got is None:
        return "—", "—"
    d, lo, hi = got
    margin = MARGIN * mean_interval(b)[0]
    up, down = verdict(lo, hi, margin), verdict(-hi, -lo, margin)
    word = ("supported" if up == down == "supported" else "refuted" if "refuted" in (up, down)
            else "undecided at this scale")
    return f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]", word


def summarise(found: list[dict]) -> dict:
    """The per-budget results: every (task, budget, method) with its count, seeds, mean and interval; the claims."""
    cells: dict[tuple, dict] = {}
    for r in found:
        where = cell_of(r)
        per = r.get("metrics", {}).get("per_example")
        if where is None or per is None:
            continue
        c = cells.setdefault((r["task"], *where), {"trainable": r["trainable"], "lr": r["lr"], "runs": {}})
        c["runs"][r["seed"]] = per
    out = {"rows": [], "claims": []}
    for (task, budget, method), c in cells.items():
        m, lo, hi = mean_interval(c["runs"])
        out["rows"].append({"task": task, "budget": budget, "method": method, "config": config_name(method, budget),
                            "rank": BUDGETS[budget][method][1], "trainable": c["trainable"], "lr": c["lr"],
                            "seeds": sorted(c["runs"]), "n_test": len(next(iter(c["runs"].values()))),
                            "seed_means": [statistics.fmean(v) for v in c["runs"].values()],
                            "mean": m, "low": lo, "high": hi})
    runs = {k: c["runs"] for k, c in cells.items()}
    for task, budget in dict.fromkeys((t, b) for t, b, _ in cells):
        at = {m: v for (t, b, m), v in runs.items() if (t, b) == (task, budget)}
        todo = [("lily", "lora", ">="), ("tl6", "lora", ">=")]
        todo += [("tl6", m, ">=") for m in at if m not in ("lora", "tl6", "vera") and not m.startswith("peft-")]
        todo += [(a, b, "~") for a, b in PAIRS]
        for a, b, kind in todo:
            if a in at and b in at:
                diff, word = claim(at[a], at[b]) if kind == ">=" else agreement(at[a], at[b])
                text = f"{a} >= {b}" if kind == ">=" else f"{a} agrees with {b} (within 10 %)"
                out["claims"].append({"task": task, "budget": budget, "claim": text, "difference": diff,
                                      "verdict": word})
    return out


def markdown(summary: dict, header: str) -> str:
    lines = [header, "", "| task | budget | method | config | rank | trainable | LR | seeds | score [95 % CI] |",
             "|---|---|---|---|---|---:|---|---|---|"]
    order = [*BUDGETS["370k"], *BUDGETS["40k"]]
    key = lambda r: (r["task"], -int(r["budget"][:-1]), order.index(r["method"]))
    for r in sorted(summary["rows"], key=key):
        lines.append(f"| {r['task']} | {r['budget']} | {r['method']} | {Path(r['config']).stem} | {r['rank']} | "
                     f"{r['trainable']:,} | {r['lr']:g} | {len(r['seeds'])} | {r['mean']:.1f} "
                     f"[{r['low']:.1f}, {r['high']:.1f}] |")
    lines += ["", "Not run: " + "; ".join(f"{m} at {b}: {why}" for m, w in NOT_RUN.items() for b, why in w.items()),
              "", ("Claims (difference of means with a 95 % paired bootstrap interval: test examples resampled, "
              "paired by example and seed; supported where the interval lies above 0 (or, for agreement, within "
              "10 % of PEFT's mean on both sides), refuted where it lies below, else undecided at this scale):"), "",
              "| task | budget | claim | difference [95 % CI] | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {c['task']} | {c['budget']} | {c['claim']} | {c['difference']} | {c['verdict']} |"
              for c in summary["claims"]]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """Score against trainable parameters, one panel per task: each method's mean with its 95 % interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in summary["rows"]))
    if not tasks:
        return
    methods = list(dict.fromkeys([*BUDGETS["370k"], *BUDGETS["40k"]]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        seen: set[str] = set()
        for r in (r for r in summary["rows"] if r["task"] == task):
            peft = r["method"].startswith("peft-")
            colour = f"C{methods.index(r['method'].removeprefix('peft-')) % 10}"
            ax.errorbar(r["trainable"], r["mean"], yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]],
                        fmt="s" if peft else "o", mfc="none" if peft else colour, color=colour, capsize=3,
                        label=r["method"] if r["method"] not in seen else None)
            seen.add(r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("accuracy" if task == "nli" else "exact match")
        ax.set_title(f"{task}: mean, 95 % interval; open squares: PEFT's", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(config: Path) -> None:
    """The kit's report of every finished part (reproduce.*), then pools.{json,md,png} beside it."""
    from tying.integrations.llm import experiment
    from tying.integrations.llm import report as kit
    from tying.integrations.llm.runconfig import load_config

    cfg, policy = experiment.prepare(load_config(config, ["stage=report"]))
    found = kit.write(cfg, policy)
    summary = summarise(found)
    hours = sum(r.get("seconds", 0) + r.get("eval_seconds", 0) for r in found) / 3600
    header = (f"{kit.header(cfg, found)} Budgets: about 40k and about 370k trainable parameters; parts took "
              f"{hours:.2f} one-thread CPU hours (training and scoring).")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pools.json").write_text(json.dumps({"settings": cfg.model_dump(mode="json"), "header": header,
                                                   "not_run": NOT_RUN, **summary}, indent=1))
    text = markdown(summary, header)
    (RESULTS / "pools.md").write_text(text)
    print(text)
    plot(summary, RESULTS / "pools.png", f"{kit.describe(cfg)}: the pool family at equal budgets (small scale)")


def write_table(sweep: Path, table: Path) -> dict:
    """The rate table of the sweep (the kit's rule, ``rates.best_lr``: the best validation score, the smaller rate on
    a tie), one rate per method and budget (config and rank), for ``rates.table``; cells whose rates all scored the
    same (no signal) take the smaller rate by that tie rule and are named in the file."""
    from tying.integrations.llm.rates import best_lr, no_signal

    data = json.loads(sweep.read_text())
    cells: dict[tuple, dict[float, float]] = {}
    for r in data["results"]:
        cells.setdefault((r["task"], Path(r["config"]).stem, r["rank"]), {})[r["lr"]] = r["score"]
    tasks = sorted({t for t, _, _ in cells})
    lr = {f"{c}/r{k}": best_lr(v) for (_, c, k), v in sorted(cells.items())}
    flat = [f"{c}/r{k}" for (_, c, k), v in sorted(cells.items()) if no_signal(v)]
    for budget, methods in BUDGETS.items():  # PEFT's rows take our pick at the same method and budget
        for ours, theirs in PAIRS:
            key = f"{Path(config_name(theirs, budget)).stem}/r{methods[theirs][1]}"
            lr.setdefault(key, lr[f"{Path(config_name(ours, budget)).stem}/r{methods[ours][1]}"])
    s = data["settings"]
    head = (f"# The pool family's rates (issue 37.5, benchmarks/configs/pools.yaml), written by benchmarks/pools.py table\n"
            f"# from {sweep.relative_to(ROOT) if sweep.is_relative_to(ROOT) else sweep}: every method and budget at "
            f"{', '.join(f'{x:g}' for x in sorted({r['lr'] for r in data['results']}))} on {', '.join(tasks)} ({s.get('n_test')} held-out "
            f"training examples, seed 0, the run's {s.get('steps')} steps x batch {s.get('batch')}); the kit's rule "
            "(rates.best_lr).\n# PEFT's Lily and VB-LoRA take our pick at the same budget (one rate for both implementations); the "
            "SQuAD parts use these too (no SQuAD sweep at this budget; the run warns).\n"
            + (f"# No signal (every rate scored the same; the smaller rate by the tie rule): {', '.join(flat)}\n" if flat else ""))
    table.write_text(head + yaml.safe_dump({"swept_on": tasks, "lr": lr}, sort_keys=False))
    print(table.read_text())
    return lr


SWEEP = {"grid": [0.01, 0.03], "extend": False, "n_val": 30, "file": "benchmarks/results/pools/lr_sweep.json"}


def one_task(config: Path, task: str, sweep: bool) -> str:
    """``config`` restricted to one task (its ``also`` cells too), as YAML: the kit runs one task of a config whose
    cells name several only this way; with ``sweep``, the rates are the SNLI sweep's (:data:`SWEEP`)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["tasks"] = [t for t in cfg["tasks"] if (t if isinstance(t, str) else t["name"]) == task]
    if not cfg["tasks"]:
        raise SystemExit(f"{config}: no task {task!r}")
    cfg["also"] = [{**a, "tasks": [task]} for a in cfg.get("also", []) if task in a["tasks"]]
    if sweep:
        cfg["rates"] = {"sweep": SWEEP}
    return yaml.safe_dump(cfg, sort_keys=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["configs", "task", "table", "report"])
    p.add_argument("task", nargs="?", help="task: the task to keep")
    p.add_argument("--sweep", action="store_true", help="task: with the SNLI sweep's rates")
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "pools.yaml"), help="the run config")
    a = p.parse_args(argv)
    if a.what == "configs":
        write_configs()
    elif a.what == "task":
        print(one_task(Path(a.config), a.task, a.sweep), end="")
    elif a.what == "table":
        write_table(RESULTS / "lr_sweep.json", ROOT / "benchmarks" / "configs" / "rates" / "pools.yaml")
    else:
        report(Path(a.config))


if __name__ == "__main__":
    sys.exit(main())
