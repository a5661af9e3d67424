"""The Tied-LoRA comparison: zero-shot, LoRA, the VeRA-like setting, TL5, TL6 and the rest of the
tied-* family, fine-tuned on the paper's five task types with a real pretrained model.

Default model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), a Llama-architecture model (30 layers,
d 576, GQA), adapted on the attention q/k/v projections (the paper's fused-QKV setting; A shared by q,
k, v), in float32 on the CPU: a SMALL-SCALE reproduction. ``--model`` takes any causal LM (a
save_pretrained folder, a hub id, a .gguf file), ``--device``/``--dtype`` any device and precision
(adapter factors stay float32), ``--data hf|DIR`` the Hugging Face datasets (docs/llm.md).

    python benchmarks/reproduce.py --quick                    # nli; zero-shot, lora, tl6, vera; < 10 min
    python benchmarks/reproduce.py --gpu                      # five tasks x lora/tl5/tl6/vera, bf16, one GPU
    python benchmarks/reproduce.py --plan benchmarks/configs/paper.yaml [--json]   # the paper's grid, no weights
    python benchmarks/reproduce.py --grid benchmarks/configs/paper.yaml             # run it (checkpoints filled in)
    python benchmarks/reproduce.py --model DIR --tasks my.jsonl --configs tl6 --dtype bfloat16 --device cuda
    python benchmarks/reproduce.py                            # five tasks; zero-shot and all nine configs (~7 h)
    python benchmarks/reproduce.py --tasks nli --configs tl5 tied-ABv --ranks 8 64   # any subset
    python benchmarks/reproduce.py --sweep --tasks nli --configs lora tl6 vera tl5 tied-Auv tied-Buv tied-ABu \
        tied-ABv tied-v --steps 30 --batch 4 --n-train 400 --n-test 60   # the LR sweep (held-out train split)

Every (task, config, rank, seed) is one part, written to <out>/parts/ as soon as it finishes; a
rerun of the full comparison skips finished parts, so a long run can be split and resumed (``--quick``
always retrains unless given ``--resume``). Writes <out>/reproduce.json, reproduce.md and reproduce.png
(score against trainable parameters, one panel per task), covering every finished part in <out> at
the run's settings, so runs of different subsets add up to one report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tying.integrations import transformers as tx
from tying.integrations.llm import grid as G
from tying.integrations.llm import hf_data
from tying.integrations.llm.finetune import finetune, generate_answers
from tying.integrations.llm.models import (
    BUILTIN,
    DTYPES,
    check_device,
    default_device,
    load_model,
    resolve,
    targets_hint,
)
from tying.integrations.llm.stats import MARGIN, mean_std, next_rate, paired_bootstrap, verdict
from tying.integrations.llm.tasks import get_task, load_jsonl_examples

import tying
from tying.errors import SelectorError, TyingError

CONFIGS = ["lora", "vera", "tl5", "tl6", "tied-Auv", "tied-Buv", "tied-ABu", "tied-ABv", "tied-v"]
QUICK = {"tasks": ["nli"], "configs": ["lora", "tl6", "vera"], "ranks": [8], "steps": 30, "n_train": 120,
         "n_test": 60, "batch": 4}
FULL = {"tasks": ["nli", "squad", "translation", "xsum", "gsm8k"], "configs": CONFIGS,
        "ranks": [8], "steps": 50, "n_train": 1000, "n_test": 100, "batch": 4}
# One modern datacenter GPU, bf16, longer training than the CPU runs; an estimate of < 12 min (docs/llm.md)
GPU = {"tasks": FULL["tasks"], "configs": ["lora", "tl5", "tl6", "vera"], "ranks": [8], "steps": 200,
       "n_train": 3200, "n_test": 200, "batch": 16, "dtype": "bfloat16", "device": "cuda", "gen_batch": 64}
SETTINGS = ("steps", "n_train", "n_test", "batch")  # a finished part is reused only if these (and its LR) match
# ...and these, where rows written before they existed count as the defaults
RUN = {"model": "smollm2-135m", "dtype": "float32", "data": None, "max_len": 256, "grad_accum": 1}
RUNTIME = {"device": "cpu", "gradient_checkpointing": False, "gen_batch": 16}  # how, not what: never compared
# Learning rates of the tied-* family (all nine): the best of {1e-3, 3e-3, 1e-2} in the sweep (``--sweep --tasks
# nli --configs lora tl6 vera tl5 tied-Auv tied-Buv tied-ABu tied-ABv tied-v --steps 30 --batch 4 --n-train 400
# --n-test 60``, run in parts), extended (``--lrs``) to 3e-2 for all but tl6 and to 1e-1 where 3e-2 won (lora,
# vera, tied-v); results/reproduce/lr_sweep.md. Chosen on SNLI, reused for the other tasks.
# lora: 3e-2 won on SNLI but its training loss did not fall on SQuAD (results/reproduce/lora-lr0.03), so 1e-2.
LR = {"lora": 1e-2, "tl5": 1e-2, "tl6": 3e-3, "tied-ABu": 1e-2, "tied-ABv": 3e-3, "tied-Auv": 3e-3,
      "tied-Buv": 1e-2, "vera": 3e-2, "tied-v": 3e-2,
      # other kinds (issue 8's quick rows), a priori: vectors 1e-2, bottleneck matrices 1e-3 / tied 3e-3
      "ia3": 1e-2, "ia3-tied": 1e-2, "bottleneck": 1e-3, "bottleneck-tied": 3e-3, "prefix": 1e-2, "prefix-tied": 1e-2}

# Rank 64: a sweep at that rank (``--sweep --tasks nli --configs lora tl6 --ranks 64 ... --out
# benchmarks/results/reproduce-r64-sweep``) moved LoRA's best to 3e-3; TL6 tied at 3e-3 and 1e-2, so kept.
LR_AT_RANK = {("lora", 64): 3e-3}


def lr_of(config: str, rank: int) -> float:
    """The swept LR of a preset; 1e-3 for a YAML spec or a preset never swept (``--lr`` overrides)."""
    return LR_AT_RANK.get((config, rank), LR.get(config, 1e-3))


def lr_key(task: str, config: str, rank: int) -> str:
    return f"{Path(task).name}/{Path(config).stem}/r{rank}"


def lr_for(s: dict, task: str, config: str, rank: int) -> float:
    """The LR a part trains at: the sweep's pick for its (task, config, rank) (``--lr-from``), else the grid
    file's or ``--lr``'s rate for its config, else the preset table (:func:`lr_of`)."""
    table = s.get("lr_of") or {}
    return table.get(lr_key(task, config, rank), table.get(config, lr_of(config, rank)))


def best_lr(scores: dict[float, float]) -> float:
    """THE rule that picks a rate from one sweep cell (every task, config and rank alike): the highest
    validation score; on a tie, the smaller rate."""
    return max(sorted(scores), key=scores.__getitem__)  # max keeps the first of equal scores


def at_edge(scores: dict[float, float]) -> bool:
    """Whether the picked rate is the grid's smallest or largest, so the grid must be extended."""
    return best_lr(scores) in (min(scores), max(scores))


def no_signal(scores: dict[float, float]) -> bool:
    """Whether every rate of a cell (two or more) scored the same (a task at its floor): no rate is best and
    no direction to extend in; the sweep stops there and ``--lr-from`` refuses the cell."""
    return len(scores) > 1 and len(set(scores.values())) == 1


def lr_table(path: str, s: dict, strict: bool = True) -> dict[str, float]:
    """The rate of every (task, config, rank) of ``s`` picked by :func:`best_lr` from a sweep file; a cell
    missing, without signal (:func:`no_signal`) or whose best rate is at its grid's edge is an error naming the
    sweep to run (left out where not ``strict``: a report then leaves out that cell's parts)."""
    results = json.loads(Path(path).read_text())["results"]
    table, problems = {}, []
    for task in s["tasks"]:
        for config in s["configs"]:
            for rank in s["ranks"]:
                scores = {r["lr"]: r["score"] for r in results
                          if (r["task"], r["config"], r.get("rank", 8)) == (task, config, rank)}
                if not scores or at_edge(scores):
                    why = ("not swept" if not scores else
                           "no signal: every rate scored the same" if no_signal(scores) else "best at the edge")
                    problems.append(f"{lr_key(task, config, rank)} ({why})")
                else:
                    table[lr_key(task, config, rank)] = best_lr(scores)
    if problems and strict:
        raise ValueError(f"--lr-from {path}: no usable rate for {', '.join(problems)}; run --sweep --extend "
                         "with those tasks, configs and ranks at the sweep's settings first")
    return table


def evaluate(model, tok, task, test, batch_size: int = 16) -> dict:
    preds = generate_answers(model, tok, [e["prompt"] for e in test], max_new_tokens=task.max_new_tokens,
                             batch_size=batch_size, postprocess=task.postprocess, threads=1)  # a 2nd thread
    # gains little when decoding small batches and made decoding 10x slower here while another process held a core
    return {**task.score(preds, task.references(test)), "examples": [p for p in preds[:5]]}


def adapt(model, config: str, rank: int, seed: int):
    """Apply ``config`` at ``rank`` (q/k/v; prefix kinds: the attention modules), factors in float32
    whatever the base's dtype (master weights). Presets whose random init has no seed of its own
    (LoRA's A, bottleneck A) draw from torch's global RNG, so seed it here: otherwise "seed 0" would
    give a different LoRA init in every process."""
    torch.manual_seed(seed)
    return tying.apply_(model, spec_of(model, config, rank), dtype=torch.float32)


def spec_of(model, config: str, rank: int):
    """A preset retargeted to this model's q/k/v (its family's names), or a YAML spec with its own targets as written."""
    if config.endswith((".yaml", ".yml")):
        return tying.load_spec(config, rank=rank)
    try:
        return tx.spec(model, config, rank=rank)
    except SelectorError as e:
        if "no known attention naming" not in str(e):
            raise
        raise SelectorError(f"{e}: {targets_hint(model)}") from e


def run_part(part: dict, out: Path, lr: float | None = None, val: bool = False) -> dict:
    """Fine-tune (or not, for zero-shot) one config on one task and score it on the test split
    (or, with ``val``, on held-out training examples, for the LR sweep)."""
    task = get_task(part["task"], part.get("data"))
    train, test = task.load(n_train=part["n_train"] + (part["n_test"] if val else 0), n_test=part["n_test"],
                            seed=part["seed"])
    if val:
        train, test = train[:part["n_train"]], train[part["n_train"]:]
    model, tok = load_model(part["model"], dtype=part["dtype"], device=part["device"])
    row = {**part, "model_name": resolve(part["model"]).description}
    if part["config"] == "zero-shot":
        row.update(trainable=0, seconds=0.0)
    else:
        counts = adapt(model, part["config"], part["rank"], part["seed"])
        lr = lr or lr_of(part["config"], part["rank"])
        hist = finetune(model, train, tok, steps=part["steps"], lr=lr, batch_size=part["batch"], seed=part["seed"],
                        schedule="linear", warmup=max(1, part["steps"] // 10), max_len=part["max_len"],
                        grad_accum=part["grad_accum"], gradient_checkpointing=part["gradient_checkpointing"],
                        progress=sys.stderr.isatty())
        if not val:
            tying.save_adapter(model, out / "adapters" / part_name(part))
        row.update(trainable=counts.trainable, lr=lr, seconds=hist["seconds"], tokens=hist["tokens"],
                   loss_first=sum(hist["loss"][:5]) / 5, loss_last=sum(hist["loss"][-5:]) / 5,
                   loss=[round(x, 4) for x in hist["loss"]])
    start = time.perf_counter()
    row["metrics"] = evaluate(model, tok, task, test, part.get("gen_batch", 16))
    row["eval_seconds"] = time.perf_counter() - start
    row["score"] = row["metrics"][task.metric]
    return row


def is_current(row: dict, s: dict) -> bool:
    """A finished part is reused and reported only at these settings and at today's LR for its config
    (zero-shot does not train: only its test size matters)."""
    old = {"model": "smollm2-135m"} if row.get("model") == BUILTIN["smollm2-135m"] else {}  # rows before --model
    row = {**row, **old}
    if any(row.get(k, RUN[k]) != s[k] for k in ("model", "dtype", "data")):
        return False
    if row.get("seed") not in seeds_of(s) or row.get("n_test") != n_test_for(s, row["task"]):
        return False
    if row["config"] == "zero-shot":
        return True
    if s.get("lr_from") and lr_key(row["task"], row["config"], row["rank"]) not in s["lr_of"]:
        return False  # rates from a sweep: a cell this run's table does not name is not this run's
    return (all(row.get(k) == s[k] for k in SETTINGS if k != "n_test")
            and all(row.get(k, RUN[k]) == s[k] for k in RUN)
            and row.get("lr") == lr_for(s, row["task"], row["config"], row["rank"]))


def part_name(p: dict) -> str:
    return f"{Path(p['task']).name}-{Path(p['config']).stem}-r{p['rank']}-s{p['seed']}"  # a .jsonl task's file name, not its path


def seeds_of(s: dict) -> list[int]:
    """The seeds of a run: ``seed`` is one or a list (``--seed 0 1 2``)."""
    return s["seed"] if isinstance(s["seed"], list) else [s["seed"]]


def n_test_for(s: dict, task: str) -> int:
    """A task's test size: ``--n-test 200 nli=500`` gives nli 500 and every other task 200."""
    return (s.get("n_test_of") or {}).get(task, s["n_test"])


def test_sizes(s: dict) -> str:
    return ", ".join([str(s["n_test"]), *(f"{t} {n}" for t, n in (s.get("n_test_of") or {}).items())])


def parts_for(s: dict, seed: int) -> list[dict]:
    s = {**RUN, **RUNTIME, **s}
    base = {**{k: s[k] for k in (*SETTINGS, *RUN, *RUNTIME)}, "seed": seed}
    parts = []
    for task in s["tasks"]:
        at = {**base, "task": task, "n_test": n_test_for(s, task)}
        if seed == seeds_of(s)[0]:  # greedy decoding of a fixed test set: zero-shot is the same at every seed
            parts.append({**at, "config": "zero-shot", "rank": 0})
        parts += [{**at, "config": c, "rank": r} for r in s["ranks"] for c in s["configs"]]
    return parts


def report(rows: list[dict], out: Path, settings: dict) -> None:
    """reproduce.json, reproduce.md (score, trainable, % of LoRA) and reproduce.png."""
    (out / "reproduce.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    lora = {(r["task"], r["rank"]): r["trainable"] for r in rows if r["config"] == "lora"}
    where = "a 2-core CPU" if settings["device"] == "cpu" else settings["device"]
    lines = [(f"Model: {describe(settings)}; adapters on q/k/v of every layer; {settings['steps']} steps x batch "
              f"{settings['batch']} x {settings['grad_accum']} accumulated, {settings['n_train']} training / "
              f"{test_sizes(settings)} test examples per task ({settings['data'] or 'packaged offline'} data), "
              f"seed {', '.join(map(str, seeds_of(settings)))}, base in {settings['dtype']}, factors float32. Run on {where}."),
             "",
             "| task | metric | config | rank | seed | score | trainable | % of LoRA | LR | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = get_task(r["task"]).metric
        pct = f"{100 * r['trainable'] / lora[(r['task'], r['rank'])]:.1f}" if (r["task"], r["rank"]) in lora else "—"
        lines.append(f"| {r['task']} | {metric} | {r['config']} | {r['rank'] or '—'} | {r['seed']} | {r['score']:.2f} | "
                     f"{r['trainable']:,} | {pct if r['trainable'] else '—'} | {r.get('lr', '—')} | {r['seconds']:.0f} |")
    lines += seed_table(rows) + loss_table(rows)
    lines += hours_table(rows, Path(settings["lr_from"]) if settings.get("lr_from") else None)
    (out / "reproduce.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'tying[bench]')")
        return
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return  # nothing finished yet: tables only
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.5, 4.5 * len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            if r["config"] == "zero-shot":
                ax.axhline(r["score"], color="gray", ls="--", lw=1, label="zero-shot")
                continue
            ax.scatter(r["trainable"], r["score"], marker="o" if r["rank"] == 8 else "s",
                       color=colour(r["config"]))
            ax.annotate(f"{r['config']} r{r['rank']}", (r["trainable"], r["score"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # keeps the zero-shot line in view
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{task} ({get_task(task).metric})")
        ax.set_xlabel("trainable parameters")
        finish(ax)
    save(fig, f"{describe(settings)}\nscore vs trainable parameters (small scale)", out / "reproduce.png")
    plot_losses(rows, out, settings, plt)


def colour(config: str) -> str:
    """One colour per config in every panel of every plot."""
    return f"C{[*LR, config].index(config) % 10}"


def finish(ax) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save(fig, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PAIRS = [("tl6", "tl5"), ("tl6", "vera")]  # compared directly, beside every config against LoRA


def per_example_cells(rows: list[dict]) -> dict[tuple, dict[int, list[float]]]:
    """{(task, config, rank): {seed: per-example scores}} of the trained parts that kept them."""
    cells: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
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


def seed_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each (task, config, rank) over its seeds as mean ± std, and its difference to LoRA (same
    task and rank, the seeds both have) with a 95 % paired bootstrap interval over the test examples, with the
    verdicts it allows on "config >= LoRA" and "config >= LoRA - 10 %"; then the pairs of :data:`PAIRS`. Only
    parts that kept their per-example scores count."""
    cells = per_example_cells(rows)
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


def mean_curves(rows: list[dict]) -> dict[tuple, list[float]]:
    """{(task, config, rank): the training loss per step averaged over seeds} of the parts that kept it."""
    by: dict[tuple, list[list[float]]] = {}
    for r in rows:
        if r.get("loss"):
            by.setdefault((r["task"], r["config"], r["rank"]), []).append(r["loss"])
    return {k: [sum(x) / len(x) for x in zip(*v)] for k, v in by.items()}


def loss_table(rows: list[dict]) -> list[str]:
    """Markdown lines: has the training loss flattened? The mean loss over the first and last 10 % of steps, and
    the share of the whole fall that happened in the last quarter of training (small: flat)."""
    curves = mean_curves(rows)
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


def hours_table(rows: list[dict], sweep_file: Path | None) -> list[str]:
    """Markdown lines: CPU hours (one thread) per task and config: the LR sweep's runs and the parts (training and
    scoring), from the seconds each recorded."""
    spent: dict[tuple, list[float]] = {}
    for r in rows:
        spent.setdefault((r["task"], r["config"]), [0.0, 0.0])[1] += r.get("seconds", 0) + r.get("eval_seconds", 0)
    if sweep_file and sweep_file.exists():
        for r in json.loads(sweep_file.read_text())["results"]:
            if (r["task"], r["config"]) in spent:
                spent[r["task"], r["config"]][0] += r.get("seconds", 0)
    lines = ["", "Budget (hours, one thread each; sweep runs before per-run timing was kept count 0):", "",
             "| task | config | sweep h | runs h |", "|---|---|---|---|"]
    lines += [f"| {t} | {c} | {a / 3600:.2f} | {b / 3600:.2f} |" for (t, c), (a, b) in spent.items()]
    total = [sum(v[i] for v in spent.values()) / 3600 for i in (0, 1)]
    return [*lines, f"| all | | {total[0]:.2f} | {total[1]:.2f} |"]


def plot_losses(rows: list[dict], out: Path, settings: dict, plt) -> None:
    """reproduce-loss.png: the training loss per step (mean over seeds, moving average over 10 % of the steps),
    one panel per task."""
    curves = mean_curves(rows)
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
    save(fig, f"{describe(settings)} (mean over seeds, moving average)", out / "reproduce-loss.png")


def sweep(s: dict, out: Path, grid=(1e-3, 3e-3, 1e-2), extend: bool = False) -> None:
    """Score each config at each LR on held-out training examples (never the test split), seed 0, at each
    rank. Cells already in <out>/lr_sweep.json at the same settings are kept and not rerun, so a sweep
    resumes, runs side by side with another, and grows. With ``extend``, a cell whose best rate
    (:func:`best_lr`) is at its grid's edge gets the next rate beyond it, until it is not."""
    f = out / "lr_sweep.json"
    same = (*SETTINGS, "model", "dtype", "data")

    def finished() -> list[dict]:  # read again before each write, so sweeps run side by side add up
        old = json.loads(f.read_text()) if f.exists() else {}
        ok = all(old.get("settings", {}).get(k, RUN.get(k)) == s[k] for k in same)
        return old.get("results", []) if ok else []

    def cell(part) -> dict[float, float]:
        key = (part["task"], part["config"], part["rank"])
        return {r["lr"]: r["score"] for r in finished() if (r["task"], r["config"], r.get("rank", 8)) == key}

    for part in parts_for(s, seed=0):
        if part["config"] == "zero-shot":
            continue
        todo = sorted(grid)
        while todo:
            for lr in todo:
                if lr in cell(part):
                    continue
                row = run_part(part, out, lr=lr, val=True)
                new = {k: part[k] for k in ("task", "config", "rank")} | {
                    "lr": lr, "score": row["score"], "seconds": row["seconds"] + row["eval_seconds"],
                    "loss_last": row["loss_last"]}
                print(new, flush=True)
                results = [r for r in finished() if (r["task"], r["config"], r.get("rank", 8), r["lr"])
                           != (part["task"], part["config"], part["rank"], lr)]
                f.write_text(json.dumps({"settings": {k: s[k] for k in same}, "results": [*results, new]}, indent=1))
            scores = cell(part)
            beyond = next_rate(best_lr(scores), up=best_lr(scores) == max(scores))
            todo = [beyond] if extend and at_edge(scores) and not no_signal(scores) and 1e-5 <= beyond <= 1 else []
    sweep_table(out, s, finished())


def sweep_table(out: Path, s: dict, results: list[dict]) -> None:
    """lr_sweep.md: one row per (task, config), one column per LR, and the best LR."""
    grid = sorted({r["lr"] for r in results})
    metric = {r["task"]: get_task(r["task"]).metric for r in results}
    lines = [(f"LR sweep: {s['steps']} steps x batch {s['batch']} on {s['n_train']} training examples, scored on "
              f"{s['n_test']} held-out *training* examples (never the test split), seed 0, base in {s['dtype']}. "
              "Best: the highest score, the smaller rate on a tie (reproduce.best_lr, the same rule for every cell)."),
             "", "| task | config | rank | " + " | ".join(f"LR {lr:g}" for lr in grid) + " | best |",
             "|---|---|---|" + "---|" * (len(grid) + 1)]
    for task, config, rank in dict.fromkeys((r["task"], r["config"], r.get("rank", 8)) for r in results):
        scores = {r["lr"]: r["score"] for r in results if (r["task"], r["config"], r.get("rank", 8)) == (task, config, rank)}
        best = "none (no signal)" if no_signal(scores) else f"{best_lr(scores):g}" + (" (edge: extend)" if at_edge(scores) else "")
        lines.append(f"| {task} ({metric[task]}) | {config} | {rank} | " + " | ".join(
            f"{scores[lr]:.1f}" if lr in scores else "—" for lr in grid) + f" | {best} |")
    (out / "lr_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def describe(s: dict) -> str:
    """The model as reports name it: the built-in's description, else the name given to --model."""
    return BUILTIN.get(s["model"], s["model"])


def check(s: dict) -> None:
    """Every input that could fail later, checked before anything is written or trained: the model,
    device and dtype, each task and its data, each config at each rank (on the model's meta-device
    twin where its config is readable)."""
    src = resolve(s["model"])
    check_device(s["device"], DTYPES[s["dtype"]])
    for t in s["tasks"]:
        get_task(t, s["data"])
        if t.endswith(".jsonl"):
            n, need = len(load_jsonl_examples(t)), n_test_for(s, t) + (1 if s["configs"] else 0)
            if n < need:  # a malformed line fails above, a short file here: not after the first parts
                raise ValueError(f"{t}: {n} usable lines, but --n-test {n_test_for(s, t)} takes that many for the test "
                                 f"set{' and training needs at least one more' if s['configs'] else ''}; "
                                 "give more lines or a smaller --n-test")
        if s["data"] is not None and not t.endswith(".jsonl"):
            hf_data.load_splits(t, s["data"])
    meta = _meta(src)
    for config in s["configs"]:
        for rank in s["ranks"]:
            try:
                spec = spec_of(meta, config, rank) if meta is not None else tying.load_spec(config, rank=rank)
                if meta is not None:
                    tying.count(meta, spec)
            except TyingError as e:
                raise TyingError(f"--configs {config} --ranks {rank} on {s['model']}: {e}") from e


def _meta(src):
    """The model on the meta device (no weights) for checks, or None where its config is not at hand (GGUF)."""
    from tying.integrations.meta_models import meta_model
    if src.kind == "builtin":
        return meta_model(src.name)
    if src.kind == "folder":
        return meta_model(str(Path(src.name) / "config.json"))
    return None


def run(s: dict, out: Path, resume: bool, train: bool = True) -> None:
    """Run every part of settings ``s`` into ``out`` (skipping finished ones with ``resume``) and report
    (``train=False``: only report)."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for part in (p for seed in seeds_of(s) for p in parts_for(s, seed) if train):  # seed by seed: a stop leaves whole seeds
        f = out / "parts" / f"{part_name(part)}.json"
        if resume and f.exists() and is_current(json.loads(f.read_text()), s):
            print(f"done already: {f.name}")
            continue
        print(f"== {part_name(part)}", flush=True)
        row = run_part(part, out, lr=lr_for(s, part["task"], part["config"], part["rank"]))
        f.write_text(json.dumps(row, indent=1))
        print(f"   {get_task(part['task'], s['data']).metric} = {row['score']:.2f}  ({time.perf_counter() - t0:.0f} s so far)",
              flush=True)
    # the report covers every finished part in <out> at these settings, not only this run's
    rows = [r for r in map(json.loads, map(Path.read_text, (out / "parts").glob("*.json"))) if is_current(r, s)]
    tasks, configs = [*FULL["tasks"], *s["tasks"]], ["zero-shot", *CONFIGS, *LR]
    rows.sort(key=lambda r: (tasks.index(r["task"]) if r["task"] in tasks else len(tasks),
                             configs.index(r["config"]) if r["config"] in configs else len(configs), r["rank"], r["seed"]))
    report(rows, out, s)
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {out}/reproduce.{{json,md,png}}")


def run_grid(path: str, out_root: Path, threads_note: dict) -> None:
    """Run a grid file model by model into ``out_root/<model>/``, resumable by parts."""
    g = G.load_grid(path)
    missing = [n for n, m in g["models"].items() if not m.get("checkpoint")]
    if missing:
        raise G.GridError(f"{path}: fill in models.<name>.checkpoint for {', '.join(missing)} (a save_pretrained "
                          "folder, hub id or .gguf file) before running the grid; --plan needs none")
    G.plan_parts(g)  # unknown configs and too-large ranks fail here, before anything runs
    t = g["training"]
    for name, m in g["models"].items():
        for seed in g["seeds"]:
            s = {**{k: t[k] for k in (*SETTINGS, "max_len", "grad_accum", "dtype", "data")}, **threads_note,
                 "model": str(m["checkpoint"]), "tasks": g["tasks"], "configs": g["configs"], "ranks": g["ranks"],
                 "seed": seed, "lr_of": g["lr"]}
            check(s)
            run(s, out_root / name, resume=True)


def _number(kind, low: float, inclusive: bool = True):
    """An argparse type: a finite ``kind`` at least (or, not ``inclusive``, above) ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {'>=' if inclusive else '>'} {low}")
        return value
    return parse


POSITIVE, NONNEG, RATE = _number(int, 1), _number(int, 0), _number(float, 0.0, inclusive=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="nli; zero-shot, lora, tl6, vera; 30 steps x 4 (< 10 min)")
    ap.add_argument("--gpu", action="store_true", help="five tasks x lora/tl5/tl6/vera, bf16, 200 steps x 16 (one GPU)")
    ap.add_argument("--plan", metavar="GRID", help="print a grid file's parts with exact trainable counts; loads no weights")
    ap.add_argument("--json", action="store_true", help="with --plan: print JSON")
    ap.add_argument("--grid", metavar="GRID", help="run a grid file (its checkpoints filled in), resumable by parts")
    ap.add_argument("--model", help="smollm2-135m (default), a save_pretrained folder, a hub id or a .gguf file")
    ap.add_argument("--device", help="cpu, cuda, mps (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=list(DTYPES),
                    help="the frozen base's dtype (factors stay float32); default bfloat16 on cuda, else float32")
    ap.add_argument("--data", help="hf (Hugging Face hub datasets) or a local folder of them; default: packaged sources")
    ap.add_argument("--max-len", type=POSITIVE)
    ap.add_argument("--grad-accum", type=POSITIVE)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--configs", nargs="*", help="none: zero-shot only")
    ap.add_argument("--ranks", nargs="+", type=POSITIVE)
    ap.add_argument("--steps", type=POSITIVE)
    ap.add_argument("--n-train", type=POSITIVE)
    ap.add_argument("--n-test", nargs="+", metavar="N|TASK=N", help="test examples per task, e.g. 200 nli=500")
    ap.add_argument("--batch", type=POSITIVE)
    ap.add_argument("--lr", type=RATE, help="one learning rate for every config (default: the swept LR table)")
    ap.add_argument("--threads", type=POSITIVE, help="torch CPU threads (two 1-thread runs side by side beat one 2-thread run)")
    ap.add_argument("--seed", type=NONNEG, nargs="+", default=[0], help="one or more seeds (data order and every init)")
    ap.add_argument("--sweep", action="store_true", help="LR sweep on held-out training examples")
    ap.add_argument("--lrs", nargs="+", type=RATE, default=[1e-3, 3e-3, 1e-2], help="the sweep's grid")
    ap.add_argument("--extend", action="store_true", help="with --sweep: extend each cell's grid past a best rate at its edge")
    ap.add_argument("--lr-from", metavar="SWEEP_JSON", help="train each (task, config, rank) at its rate in a sweep file")
    ap.add_argument("--report", action="store_true", help="train nothing: report the finished parts at these settings")
    ap.add_argument("--resume", action="store_true", help="with --quick: reuse finished parts (the full run always does)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/reproduce[-quick|-gpu]")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.plan:
            g = G.load_grid(args.plan)
            rows = G.plan_parts(g)
            print(json.dumps(rows, indent=1) if args.json else G.table(rows, g))
            return
        runtime = {"device": args.device or default_device(), "gradient_checkpointing": args.gradient_checkpointing,
                   "gen_batch": 16}
        if args.grid:
            return run_grid(args.grid, Path(args.out or "benchmarks/results/reproduce-grid"), runtime)
        s = {**RUN, **runtime, **(GPU if args.gpu else QUICK if args.quick else FULL)}
        for k in ("tasks", "configs", "ranks", *(k for k in SETTINGS if k != "n_test"), "model", "device", "dtype", "data", "max_len", "grad_accum"):
            if getattr(args, k) is not None:
                s[k] = getattr(args, k)
        s["seed"] = args.seed[0] if len(args.seed) == 1 else args.seed
        for n in args.n_test or []:
            task, _, size = n.rpartition("=")
            if not size.isdigit() or int(size) < 1:
                raise ValueError(f"--n-test {n}: give a whole number of test examples >= 1, as N or TASK=N")
            if task:
                s.setdefault("n_test_of", {})[task] = int(size)
            else:
                s["n_test"] = int(size)
        if args.dtype is None and s["device"].startswith("cuda"):
            s["dtype"] = "bfloat16"  # float32 stays the CPU default: docs/llm.md, "Precision on this CPU"
        if args.lr is not None:
            s["lr_of"] = {c: args.lr for c in s["configs"]}
        if args.lr_from:
            if not Path(args.lr_from).is_file():
                raise ValueError(f"--lr-from {args.lr_from}: no such sweep file (benchmarks/results/.../lr_sweep.json)")
            s["lr_of"], s["lr_from"] = lr_table(args.lr_from, s, strict=not args.report), args.lr_from
        out = Path(args.out or f"benchmarks/results/reproduce{'-gpu' if args.gpu else '-quick' if args.quick else ''}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder for the results")
        check(s)
    except (TyingError, ValueError) as e:  # bad input: nothing has been written yet
        sys.exit(f"error: {e}")
    try:
        if args.sweep:
            out.mkdir(parents=True, exist_ok=True)
            return sweep(s, out, args.lrs, extend=args.extend)
        run(s, out, resume=args.resume or not (args.quick or args.gpu), train=not args.report)
    except TyingError as e:  # e.g. a non-finite loss: the part that hit it was not written
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
