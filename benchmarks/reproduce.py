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
from tying.integrations.llm.stats import mean_std, paired_bootstrap, verdict
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
                   loss_first=sum(hist["loss"][:5]) / 5, loss_last=sum(hist["loss"][-5:]) / 5)
    row["metrics"] = evaluate(model, tok, task, test, part.get("gen_batch", 16))
    row["score"] = row["metrics"][task.metric]
    return row


def is_current(row: dict, s: dict) -> bool:
    """A finished part is reused and reported only at these settings and at today's LR for its config
    (zero-shot does not train: only its test size matters)."""
    old = {"model": "smollm2-135m"} if row.get("model") == BUILTIN["smollm2-135m"] else {}  # rows before --model
    row = {**row, **old}
    if any(row.get(k, RUN[k]) != s[k] for k in ("model", "dtype", "data")):
        return False
    if row["config"] == "zero-shot":
        return row.get("seed") == s["seed"] and row.get("n_test") == s["n_test"]
    return (all(row.get(k) == s[k] for k in (*SETTINGS, "seed")) and all(row.get(k, RUN[k]) == s[k] for k in RUN)
            and row.get("lr") == (s.get("lr_of") or {}).get(row["config"], lr_of(row["config"], row["rank"])))


def part_name(p: dict) -> str:
    return f"{Path(p['task']).name}-{Path(p['config']).stem}-r{p['rank']}-s{p['seed']}"  # a .jsonl task's file name, not its path


def parts_for(s: dict, seed: int) -> list[dict]:
    s = {**RUN, **RUNTIME, **s}
    base = {**{k: s[k] for k in (*SETTINGS, *RUN, *RUNTIME)}, "seed": seed}
    parts = []
    for task in s["tasks"]:
        parts.append({**base, "task": task, "config": "zero-shot", "rank": 0})
        parts += [{**base, "task": task, "config": c, "rank": r} for r in s["ranks"] for c in s["configs"]]
    return parts


def report(rows: list[dict], out: Path, settings: dict) -> None:
    """reproduce.json, reproduce.md (score, trainable, % of LoRA) and reproduce.png."""
    (out / "reproduce.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    lora = {(r["task"], r["rank"]): r["trainable"] for r in rows if r["config"] == "lora"}
    where = "a 2-core CPU" if settings["device"] == "cpu" else settings["device"]
    lines = [(f"Model: {describe(settings)}; adapters on q/k/v of every layer; {settings['steps']} steps x batch "
              f"{settings['batch']} x {settings['grad_accum']} accumulated, {settings['n_train']} training / "
              f"{settings['n_test']} test examples per task ({settings['data'] or 'packaged offline'} data), "
              f"seed {settings['seed']}, base in {settings['dtype']}, factors float32. Run on {where}."),
             "",
             "| task | metric | config | rank | score | trainable | % of LoRA | LR | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = get_task(r["task"]).metric
        pct = f"{100 * r['trainable'] / lora[(r['task'], r['rank'])]:.1f}" if (r["task"], r["rank"]) in lora else "—"
        lines.append(f"| {r['task']} | {metric} | {r['config']} | {r['rank'] or '—'} | {r['score']:.2f} | "
                     f"{r['trainable']:,} | {pct if r['trainable'] else '—'} | {r.get('lr', '—')} | {r['seconds']:.0f} |")
    lines += seed_table(rows)
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
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.5, 4.5 * len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            if r["config"] == "zero-shot":
                ax.axhline(r["score"], color="gray", ls="--", lw=1, label="zero-shot")
                continue
            ax.scatter(r["trainable"], r["score"], marker="o" if r["rank"] == 8 else "s",
                       color=f"C{[*LR, r['config']].index(r['config']) % 10}")  # one colour per config in every panel
            ax.annotate(f"{r['config']} r{r['rank']}", (r["trainable"], r["score"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # keeps the zero-shot line in view
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{task} ({get_task(task).metric})")
        ax.set_xlabel("trainable parameters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{describe(settings)}\nscore vs trainable parameters (small scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "reproduce.png", dpi=110)


def seed_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each (task, config, rank) over its seeds as mean ± std, and its difference to LoRA (same
    task and rank, the seeds both have) with a 95 % paired bootstrap interval over the test examples; only parts
    that kept their per-example scores count."""
    cells: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        per = r.get("metrics", {}).get("per_example")
        if per is not None and r["config"] != "zero-shot":
            cells.setdefault((r["task"], r["config"], r["rank"]), {})[r["seed"]] = per
    if not cells:
        return []
    lines = ["", ("Across seeds (parts with per-example scores): mean ± std over seeds; difference to LoRA at the "
                  "same rank with a 95 % paired bootstrap interval (test examples resampled, paired by example and "
                  "seed; BLEU resamples sentence BLEU); the claim checked is \"config >= LoRA\"."), "",
             "| task | config | rank | seeds | score | − LoRA [95 % CI] | config >= LoRA |", "|---|---|---|---|---|---|---|"]
    for (task, config, rank), by_seed in sorted(cells.items()):
        mean, std = mean_std([sum(v) / len(v) for v in by_seed.values()])
        ref = cells.get((task, "lora", rank), {})
        both = sorted(set(by_seed) & set(ref))
        vs = claim = "—"
        if config != "lora" and both and all(len(by_seed[k]) == len(ref[k]) for k in both):
            d, lo, hi = paired_bootstrap([by_seed[k] for k in both], [ref[k] for k in both])
            vs, claim = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]", verdict(lo, hi)
        lines.append(f"| {task} | {config} | {rank} | {len(by_seed)} | {mean:.1f} ± {std:.1f} | {vs} | {claim} |")
    return lines


def sweep(s: dict, out: Path, grid=(1e-3, 3e-3, 1e-2)) -> None:
    """Score each config at each LR on held-out training examples (never the test split). Results of
    earlier sweeps with the same settings in <out>/lr_sweep.json are kept, so a grid can be extended."""
    f = out / "lr_sweep.json"

    def finished() -> list[dict]:  # read again before each write, so sweeps run side by side add up
        old = json.loads(f.read_text()) if f.exists() else {}
        return old.get("results", []) if all(old.get("settings", {}).get(k) == s[k] for k in SETTINGS) else []

    for part in parts_for({**s, "ranks": s["ranks"][:1]}, seed=0):
        if part["config"] == "zero-shot":
            continue
        for lr in grid:
            row = run_part(part, out, lr=lr, val=True)
            new = {"task": part["task"], "config": part["config"], "lr": lr, "score": row["score"]}
            print(new, flush=True)
            results = [r for r in finished() if (r["task"], r["config"], r["lr"]) != (new["task"], new["config"], lr)]
            f.write_text(json.dumps({"settings": s, "results": [*results, new]}, indent=1))
    sweep_table(out, s, finished())


def sweep_table(out: Path, s: dict, results: list[dict]) -> None:
    """lr_sweep.md: one row per (task, config), one column per LR, and the best LR."""
    grid = sorted({r["lr"] for r in results})
    metric = {r["task"]: get_task(r["task"]).metric for r in results}
    lines = [(f"LR sweep: {s['steps']} steps x batch {s['batch']} on {s['n_train']} training examples, scored on "
              f"{s['n_test']} held-out *training* examples (never the test split); rank {s['ranks'][0]}, seed 0."), "",
             "| task | config | " + " | ".join(f"LR {lr:g}" for lr in grid) + " | best |",
             "|---|---|" + "---|" * (len(grid) + 1)]
    for task, config in dict.fromkeys((r["task"], r["config"]) for r in results):
        scores = {r["lr"]: r["score"] for r in results if (r["task"], r["config"]) == (task, config)}
        lines.append(f"| {task} ({metric[task]}) | {config} | " + " | ".join(
            f"{scores[lr]:.1f}" if lr in scores else "—" for lr in grid) + f" | {max(scores, key=scores.get):g} |")
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
            load_jsonl_examples(t)  # a malformed line fails here, not after the first parts
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
    from tying.models import meta_model
    if src.kind == "builtin":
        return meta_model(src.name)
    if src.kind == "folder":
        return meta_model(str(Path(src.name) / "config.json"))
    return None


def run(s: dict, out: Path, resume: bool) -> None:
    """Run every part of settings ``s`` into ``out`` (skipping finished ones with ``resume``) and report."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for part in parts_for(s, s["seed"]):
        f = out / "parts" / f"{part_name(part)}.json"
        if resume and f.exists() and is_current(json.loads(f.read_text()), s):
            print(f"done already: {f.name}")
            continue
        print(f"== {part_name(part)}", flush=True)
        row = run_part(part, out, lr=s.get("lr_of", {}).get(part["config"]))
        f.write_text(json.dumps(row, indent=1))
        print(f"   {get_task(part['task'], s['data']).metric} = {row['score']:.2f}  ({time.perf_counter() - t0:.0f} s so far)",
              flush=True)
    # the report covers every finished part in <out> at these settings, not only this run's
    rows = [r for r in map(json.loads, map(Path.read_text, (out / "parts").glob("*.json"))) if is_current(r, s)]
    tasks, configs = [*FULL["tasks"], *s["tasks"]], ["zero-shot", *CONFIGS, *LR]
    rows.sort(key=lambda r: (tasks.index(r["task"]) if r["task"] in tasks else len(tasks),
                             configs.index(r["config"]) if r["config"] in configs else len(configs), r["rank"]))
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
    ap.add_argument("--max-len", type=int)
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--configs", nargs="*", help="none: zero-shot only")
    ap.add_argument("--ranks", nargs="+", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float, help="one learning rate for every config (default: the swept LR table)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (two 1-thread runs side by side beat one 2-thread run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="LR sweep on held-out training examples")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2], help="the sweep's grid")
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
        for k in ("tasks", "configs", "ranks", *SETTINGS, "model", "device", "dtype", "data", "max_len", "grad_accum"):
            if getattr(args, k) is not None:
                s[k] = getattr(args, k)
        s["seed"] = args.seed
        if args.dtype is None and s["device"].startswith("cuda"):
            s["dtype"] = "bfloat16"  # float32 stays the CPU default: docs/llm.md, "Precision on this CPU"
        if args.lr is not None:
            s["lr_of"] = {c: args.lr for c in s["configs"]}
        check(s)
    except (TyingError, ValueError) as e:  # bad input: nothing has been written yet
        sys.exit(f"error: {e}")
    out = Path(args.out or f"benchmarks/results/reproduce{'-gpu' if args.gpu else '-quick' if args.quick else ''}")
    if args.sweep:
        out.mkdir(parents=True, exist_ok=True)
        return sweep(s, out, args.lrs)
    run(s, out, resume=args.resume or not (args.quick or args.gpu))


if __name__ == "__main__":
    main()
