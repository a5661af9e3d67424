"""The report of a run: every finished part in ``<out>/parts/`` that is current under the config (all shards' parts
merge), as ``reproduce.json``, ``reproduce.md`` (scores, seeds with paired intervals against LoRA, loss curves,
budget) and ``reproduce.png`` / ``reproduce-loss.png``. Each row is scored by its task's headline metric (a JSONL
task's ``metric``), which the tables, intervals and plots all use.

    write(cfg, rates.Rates(cfg))
"""

from __future__ import annotations

import json
from pathlib import Path

from ...files import atomic_write, write_text
from . import grid
from .metrics import METRICS
from .models import BUILTIN
from .parts import is_current
from .rates import sweep_file
from .runconfig import RunConfig
from .stats import MARGIN, mean_std, paired_bootstrap, verdict
from .tasks import TASKS

TASK_ORDER = ("nli", "squad", "translation", "xsum", "gsm8k")  # then the run's own, in its order
CONFIG_ORDER = ("zero-shot", "lora", "vera", "tl5", "tl6", "tied-Auv", "tied-Buv", "tied-ABu", "tied-ABv", "tied-v",
                "ia3", "ia3-tied", "bottleneck", "bottleneck-tied", "prefix", "prefix-tied")  # then any other
PAIRS = [("tl6", "tl5"), ("tl6", "vera")]  # compared directly, beside every config against LoRA


def row_metric(row: dict) -> str:
    """The headline metric a row is scored by: its JSONL task's, its built-in task's, or (old JSONL rows) EM."""
    if row.get("metric"):
        return METRICS[row["metric"]][1]
    return TASKS[row["task"]].metric if row["task"] in TASKS else "exact_match"


def rows(cfg: RunConfig, rates) -> list[dict]:
    """Every finished part in ``<out>/parts/`` that is current under ``cfg`` (:func:`.parts.is_current`), in report
    order: task, config, rank, seed."""
    files = sorted((Path(cfg.out) / "parts").glob("*.json"))
    found = [r for r in (json.loads(f.read_text()) for f in files) if is_current(r, cfg, rates)]
    tasks = [*TASK_ORDER, *(t.name for t in cfg.tasks)]
    found.sort(key=lambda r: (tasks.index(r["task"]),
                              CONFIG_ORDER.index(r["config"]) if r["config"] in CONFIG_ORDER else len(CONFIG_ORDER),
                              r["rank"], r["seed"]))
    return found


def describe(cfg: RunConfig) -> str:
    """The model as reports name it: the built-in's description, else the name the config gives."""
    return BUILTIN.get(cfg.model.name, cfg.model.name)


def header(cfg: RunConfig, found: list[dict]) -> str:
    """The report's first line: what ran, where."""
    sizes = ", ".join([str(cfg.n_test), *(f"{t.name} {t.n_test}" for t in cfg.tasks if t.n_test)])
    cpus = sorted({r.get("cpus", 2) for r in found}) or [2]  # rows before cpus was recorded: this project's 2 cores
    device = cfg.model.device or "cpu"
    where = f"a {'/'.join(map(str, cpus))}-core CPU" if device == "cpu" else device
    return (f"Model: {describe(cfg)}; adapters on q/k/v of every layer; {cfg.steps} steps x batch {cfg.batch} x "
            f"{cfg.grad_accum} accumulated, {cfg.n_train} training / {sizes} test examples per task "
            f"({cfg.data or 'packaged offline'} data), seed {', '.join(map(str, cfg.seeds))}, base in "
            f"{grid.dtype_of(cfg)}, factors float32. Run on {where}.")


def write(cfg: RunConfig, rates, plots: bool = True) -> list[dict]:
    """reproduce.json, reproduce.md (score, trainable, % of LoRA, seeds, losses, budget) and the plots; the rows."""
    out, found = Path(cfg.out), rows(cfg, rates)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "reproduce.json", json.dumps({"settings": cfg.model_dump(mode="json"), "rows": found}, indent=1))
    lora = {(r["task"], r["rank"]): r["trainable"] for r in found if r["config"] == "lora"}
    lines = [header(cfg, found), "",
             "| task | metric | config | rank | seed | score | trainable | % of LoRA | LR | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        pct = f"{100 * r['trainable'] / lora[(r['task'], r['rank'])]:.1f}" if (r["task"], r["rank"]) in lora else "—"
        lines.append(f"| {r['task']} | {row_metric(r)} | {r['config']} | {r['rank'] or '—'} | {r['seed']} | "
                     f"{r['score']:.2f} | {r['trainable']:,} | {pct if r['trainable'] else '—'} | {r.get('lr', '—')} | "
                     f"{r['seconds']:.0f} |")
    swept = cfg.rates.sweep is not None and any(rates(*c)[1] == "sweep" for c in grid.cells(cfg))
    lines += seed_table(found) + loss_table(found) + hours_table(found, sweep_file(cfg) if swept else None)
    write_text(out / "reproduce.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if plots:
        plot(found, cfg)
    return found


def plot(found: list[dict], cfg: RunConfig) -> None:
    """reproduce.png (score against trainable parameters, one panel per task) and reproduce-loss.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("matplotlib missing: no plot (pip install 'tying[bench]')")
        return
    tasks = list(dict.fromkeys(r["task"] for r in found))
    if not tasks:
        return  # nothing finished yet: tables only
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.5, 4.5 * len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in found if r["task"] == task):
            if r["config"] == "zero-shot":
                ax.axhline(r["score"], color="gray", ls="--", lw=1, label="zero-shot")
                continue
            ax.scatter(r["trainable"], r["score"], marker="o" if r["rank"] == 8 else "s", color=colour(r["config"]))
            ax.annotate(f"{r['config']} r{r['rank']}", (r["trainable"], r["score"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # keeps the zero-shot line in view
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{task} ({row_metric(next(r for r in found if r['task'] == task))})")
        ax.set_xlabel("trainable parameters")
        finish(ax)
    save(fig, f"{describe(cfg)}\nscore vs trainable parameters (small scale)", Path(cfg.out) / "reproduce.png")
    curves = mean_curves(found)
    if not curves:
        return
    tasks = list(dict.fromkeys(k[0] for k in curves))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.5, 4.5 * len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, config, rank), c in curves.items():
            if t != task:
                continue
            w = max(1, len(c) // 10)
            smooth = [sum(c[max(0, i - w + 1):i + 1]) / len(c[max(0, i - w + 1):i + 1]) for i in range(len(c))]
            ax.plot(range(1, len(c) + 1), smooth, label=f"{config} r{rank}", ls="-" if rank == 8 else "--",
                    color=colour(config))
        ax.set_title(f"{task}: training loss")
        ax.set_xlabel("step")
        finish(ax)
    save(fig, f"{describe(cfg)} (mean over seeds, moving average)", Path(cfg.out) / "reproduce-loss.png")


def colour(config: str) -> str:
    """One colour per config in every panel of every plot."""
    return f"C{[*CONFIG_ORDER[1:], config].index(config) % 10}"


def finish(ax) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save(fig, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def per_example_cells(found: list[dict]) -> dict[tuple, dict[int, list[float]]]:
    """{(task, config, rank): {seed: per-example scores}} of the trained parts that kept them."""
    cells: dict[tuple, dict[int, list[float]]] = {}
    for r in found:
        per = r.get("metrics", {}).get("per_example")
        if per is not None and r["config"] != "zero-shot":
            cells.setdefault((r["task"], r["config"], r["rank"]), {})[r["seed"]] = per
    return cells


def compare(a: dict[int, list[float]], b: dict[int, list[float]]):
    """(a - b, 95 % low, high) over the seeds both have, or None where they share none (or score other examples)."""
    both = sorted(set(a) & set(b))
    if not both or any(len(a[k]) != len(b[k]) for k in both):
        return None
    return paired_bootstrap([a[k] for k in both], [b[k] for k in both])


def seed_table(found: list[dict]) -> list[str]:
    """Markdown lines: each (task, config, rank) over its seeds as mean ± std, and its difference to LoRA (same
    task and rank, the seeds both have) with a 95 % paired bootstrap interval over the test examples, with the
    verdicts it allows on "config >= LoRA" and "config >= LoRA - 10 %"; then the pairs of :data:`PAIRS`. Only
    parts that kept their per-example scores count."""
    cells = per_example_cells(found)
    if not cells:
        return []
    lines = ["", ("Across seeds (parts with per-example scores): mean ± std over seeds; difference to LoRA at the "
                  "same rank with a 95 % paired bootstrap interval (test examples resampled, paired by example and "
                  "seed; BLEU resamples sentence BLEU). Verdicts: supported where the interval lies above the "
                  f"claim's bound, refuted where it lies below, else undecided; \"comparable\" allows {MARGIN:.0%} of "
                  "LoRA's mean score."), "",
             "| task | config | rank | seeds | score | − LoRA [95 % CI] | config >= LoRA | comparable to LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, config, rank), by_seed in sorted(cells.items()):
        mean, std = mean_std([sum(v) / len(v) for v in by_seed.values()])
        ref = cells.get((task, "lora", rank), {})
        got = compare(by_seed, ref) if config != "lora" else None
        vs = strict = close = "—"
        if got:
            d, lo, hi = got
            margin = MARGIN * mean_std([sum(v) / len(v) for v in ref.values()])[0]
            vs, strict, close = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]", verdict(lo, hi), verdict(lo, hi, margin)
        lines.append(f"| {task} | {config} | {rank} | {len(by_seed)} | {mean:.1f} ± {std:.1f} | {vs} | {strict} | {close} |")
    # the pairs at each rank, and each config at its highest rank against its lowest ("stable across ranks")
    pairs = [((task, a, rank), (task, b, rank)) for (task, config, rank) in sorted(cells) for a, b in PAIRS
             if config == a and (task, b, rank) in cells]
    ranks = {}
    for task, config, rank in sorted(cells):
        ranks.setdefault((task, config), []).append(rank)
    pairs += [((t, c, max(r)), (t, c, min(r))) for (t, c), r in ranks.items() if len(r) > 1]
    rows_out = [(a, b, compare(cells[a], cells[b])) for a, b in pairs]
    if any(got for *_, got in rows_out):
        lines += ["", "| task | first | second | difference [95 % CI] | first >= second |", "|---|---|---|---|---|"]
        lines += [f"| {a[0]} | {a[1]} r{a[2]} | {b[1]} r{b[2]} | {got[0]:+.1f} [{got[1]:+.1f}, {got[2]:+.1f}] | "
                  f"{verdict(*got[1:])} |" for a, b, got in rows_out if got]
    return lines


def mean_curves(found: list[dict]) -> dict[tuple, list[float]]:
    """{(task, config, rank): the training loss per step averaged over seeds} of the parts that kept it."""
    by: dict[tuple, list[list[float]]] = {}
    for r in found:
        if r.get("loss"):
            by.setdefault((r["task"], r["config"], r["rank"]), []).append(r["loss"])
    return {k: [sum(x) / len(x) for x in zip(*v)] for k, v in by.items()}


def loss_table(found: list[dict]) -> list[str]:
    """Markdown lines: has the training loss flattened? The mean loss over the first and last 10 % of steps, and
    the share of the whole fall that happened in the last quarter of training (small: flat)."""
    curves = mean_curves(found)
    if not curves:
        return []
    lines = ["", ("Training loss (mean over seeds): first and last 10 % of the steps, and the share of its fall "
                  "(first 10 % to last 25 %) that came in the last quarter of training; under ~10 % reads as flat."),
             "", "| task | config | rank | steps | loss, first 10 % | loss, last 10 % | fall in last quarter |",
             "|---|---|---|---|---|---|---|"]
    for (task, config, rank), c in curves.items():
        first, q3, last = span_mean(c, 0, 0.1), span_mean(c, 0.5, 0.75), span_mean(c, 0.75, 1.0)
        share = f"{(q3 - last) / (first - last):.0%}" if first > last else "— (no fall)"
        lines.append(f"| {task} | {config} | {rank} | {len(c)} | {first:.3f} | {span_mean(c, 0.9, 1.0):.3f} | {share} |")
    return lines


def span_mean(curve: list[float], a: float, b: float) -> float:
    """The mean of ``curve`` from fraction ``a`` to ``b`` of its length (at least one point)."""
    lo = int(a * len(curve))
    hi = max(int(b * len(curve)), lo + 1)
    return sum(curve[lo:hi]) / (hi - lo)


def hours_table(found: list[dict], sweep: Path | None) -> list[str]:
    """Markdown lines: CPU hours (one thread) per task and config: the rate sweep's runs and the parts (training and
    scoring), from the seconds each recorded."""
    spent: dict[tuple, list[float]] = {}
    for r in found:
        spent.setdefault((r["task"], r["config"]), [0.0, 0.0])[1] += r.get("seconds", 0) + r.get("eval_seconds", 0)
    if sweep and sweep.exists():
        for r in json.loads(sweep.read_text())["results"]:
            if (r["task"], r["config"]) in spent:
                spent[r["task"], r["config"]][0] += r.get("seconds", 0)
    lines = ["", "Budget (hours, one thread each; sweep runs before per-run timing was kept count 0):", "",
             "| task | config | sweep h | runs h |", "|---|---|---|---|"]
    lines += [f"| {t} | {c} | {a / 3600:.2f} | {b / 3600:.2f} |" for (t, c), (a, b) in spent.items()]
    total = [sum(v[i] for v in spent.values()) / 3600 for i in (0, 1)]
    return [*lines, f"| all | | {total[0]:.2f} | {total[1]:.2f} |"]
