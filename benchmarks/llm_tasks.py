"""The LLM tasks trained *jointly*: one TL6 across tasks (A and B tied across layers, projections and tasks; u and
v per layer, module and task) on mixed batches, against a separate TL6 and a separate LoRA per task (the seeded
comparison's committed parts, same model, data, seeds and step budget). Small-scale reproduction.

    python benchmarks/llm_tasks.py "tasks=[{name: nli, n_test: 500}, squad, translation, gsm8k]"   # committed run
    python benchmarks/llm_tasks.py seeds=[0] & python benchmarks/llm_tasks.py seeds=[1]   # side by side
    python benchmarks/llm_tasks.py --report                  # the report from the finished seeds

Without ``tasks=`` it takes configs/seeded.yaml's five tasks, seeds 0-2 (about 45 min a seed on one thread of a
shared 2-core CPU); XSum's source package is no longer on the registry, so a fresh cache needs the line above.

Any run config (docs/llm.md) and ``key=value`` overrides: ``python benchmarks/llm_tasks.py CONFIG.yaml out=DIR``.
The joint run sees what the separate runs see together: every task's ``n_train`` training examples of that seed,
shuffled into one stream, ``steps`` x (number of tasks) steps of ``batch`` rows, each row routed to its task
(``TyingTrainer``'s task column). Each task's own u and v train at its swept TL6 rate, the shared A and B at the
median of those rates. Each seed is a part, run by the kit's driver (:func:`parts.drive`): written to
``<out>/parts/`` as it finishes, skipped when there, a line per finished seed with the time left; the report
(``llm_tasks.md``, ``.json``) compares with ``--separate`` (default: the config's ``out``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tying.integrations.llm import experiment, grid, parts
from tying.integrations.llm.finetune import finetune
from tying.integrations.llm.models import load_model
from tying.integrations.llm.progress import clock
from tying.integrations.llm.report import compare
from tying.integrations.llm.runconfig import ConfigError, load_config
from tying.integrations.llm.stats import MARGIN, mean_std, verdict
from tying.integrations.llm.tasks import get_task

import tying
from tying.errors import TyingError

ROOT = Path(__file__).resolve().parents[1]
CONFIG, RANK = "tl6", 8
SEPARATE = ("lora", CONFIG)  # the separate runs the joint one is compared with


def wanted(cfg, rates) -> dict:
    """What a joint part at ``cfg`` records and a finished one must match to be reused: model, sizes, rates."""
    lrs = {task_key(t.name): rates(t.name, CONFIG, RANK)[0] for t in cfg.tasks}
    return {"model": cfg.model.name, "dtype": cfg.model.dtype, "steps": cfg.steps * len(lrs), "batch": cfg.batch,
            "n_train": cfg.n_train, "max_len": cfg.max_len, "grad_accum": cfg.grad_accum, "lr": lrs,
            "lr_shared": statistics.median(lrs.values()), "n_test": {t.name: cfg.n_test_of(t) for t in cfg.tasks}}


def is_current(row: dict, want: dict) -> bool:
    got = {**row, "n_test": {name: t["n_test"] for name, t in row["tasks"].items()}}
    return all(got.get(k, 1 if k == "grad_accum" else None) == v for k, v in want.items())  # grad_accum: 1 before


def joint_part(cfg, want: dict, seed: int, out: Path) -> dict:
    """Train one TL6 across ``cfg``'s tasks at ``seed`` and score every task on its own test set."""
    settings = {p.task: p for p in grid.parts(cfg.model_copy(update={"seeds": [seed]})) if p.config == "zero-shot"}
    tasks = {name: get_task(name, p.data, p.metric, p.max_new_tokens) for name, p in settings.items()}
    data = {name: parts.data_of(p, tasks[name]) for name, p in settings.items()}  # the separate parts' examples
    keys, lrs, shared = list(want["lr"]), want["lr"], want["lr_shared"]
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    torch.manual_seed(seed)
    spec = parts.spec_of(model, CONFIG, RANK).model_dump(mode="json")
    counts = tying.apply_(model, tying.load_spec(spec, tasks=keys), dtype=torch.float32)
    train = [{**e, "task": key} for key, (examples, _) in zip(keys, data.values()) for e in examples]

    def lr_of(name: str) -> float:  # a task's own copies end in "#task"
        return lrs.get(name.rpartition("#")[2], shared) if "#" in name else shared

    hist = finetune(model, train, tok, steps=want["steps"], lr=shared, lr_of=lr_of, batch_size=cfg.batch, seed=seed,
                    schedule="linear", warmup=max(1, want["steps"] // 10), max_len=cfg.max_len,
                    grad_accum=cfg.grad_accum, gradient_checkpointing=cfg.gradient_checkpointing,
                    progress=sys.stderr.isatty())
    tying.save_adapter(model, out / "adapters" / joint_name(seed))
    scores = {}
    for key, (name, (_, test)) in zip(keys, data.items()):
        start = time.perf_counter()
        with tying.adapters(model, key):
            metrics = parts.evaluate(model, tok, tasks[name], test, cfg.gen_batch)
        scores[name] = {"score": metrics[tasks[name].metric], "metric": tasks[name].metric, "metrics": metrics,
                        "max_new_tokens": tasks[name].max_new_tokens,
                        "eval_seconds": time.perf_counter() - start, "n_test": len(test)}
    return {**{k: v for k, v in want.items() if k != "n_test"}, "seed": seed, "config": CONFIG, "rank": RANK,
            "trainable": counts.trainable, "per_task": counts.per_task, "seconds": hist["seconds"],
            "tokens": hist["tokens"], "loss": [round(x, 4) for x in hist["loss"]], "tasks": scores}


def joint_name(seed: int) -> str:
    """A joint seed's name: its part file's (with ``.json``) and its adapter folder's."""
    return f"joint-{CONFIG}-r{RANK}-s{seed}"


def joint_line(row: dict) -> str:
    """A finished joint seed in one line: its name, each task's score, and the process time it took."""
    scores = ", ".join(f"{task} {t['score']:.2f}" for task, t in row["tasks"].items())
    return f"{joint_name(row['seed'])}: {scores} ({clock(row['cpu_seconds'])} CPU)"


def task_key(name: str) -> str:
    """A task's name in the spec's ``tasks``: a JSONL file's stem, in the letters a task name allows."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(name).stem) if name.endswith(".jsonl") else name


def separate_cells(cfg, rates, config: str) -> dict[str, dict[int, dict]]:
    """{task: {seed: row}} of the separate parts of ``config`` at rank 8 under ``cfg.out`` that are current at
    ``cfg`` (its model, sizes, test sets and rates: :func:`parts.is_current`)."""
    cells: dict[str, dict[int, dict]] = {}
    for f in sorted((Path(cfg.out) / "parts").glob(f"*-{config}-r{RANK}-s*.json")):
        row = json.loads(f.read_text())
        if row.get("config") == config and row.get("rank") == RANK and parts.is_current(row, cfg, rates):
            cells.setdefault(row["task"], {})[row["seed"]] = row
    return cells


def versus(mine: dict[int, list[float]], rows: dict[int, dict]) -> dict | None:
    """Joint - separate over the seeds both have, with its interval and the "within 10 %" verdict."""
    theirs = {s: r["metrics"]["per_example"] for s, r in rows.items() if s in mine}  # the seeds both have
    got = compare(mine, theirs)
    if not got:
        return None
    base = mean_std([statistics.fmean(v) for v in theirs.values()])[0]
    d, lo, hi = got
    return {"mean": base, "diff": d, "lo": lo, "hi": hi, "within_10": verdict(lo, hi, MARGIN * base)}


def report(cfg, rates, joint: dict[int, dict], out: Path) -> str:
    """Markdown: per task, separate LoRA, separate TL6 and joint TL6 over seeds; joint - separate with a paired
    bootstrap interval over test examples and seeds, and the verdict on "joint within 10 % of separate"."""
    seeds, names = sorted(joint), [t.name for t in cfg.tasks]
    sep = {c: separate_cells(cfg, rates, c) for c in SEPARATE}
    for c, cells in sep.items():
        for name in names:
            if set(seeds) - set(cells.get(name, {})):
                print(f"warning: {name}: no separate {c} part at these settings for seeds "
                      f"{sorted(set(seeds) - set(cells.get(name, {})))} under {cfg.out}", flush=True)
    lines = [("| task | metric | separate LoRA | separate TL6 | joint TL6 | joint − TL6 [95 % CI] | within 10 % of TL6 "
             "| joint − LoRA [95 % CI] | within 10 % of LoRA |"), "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in names:
        mine = {s: joint[s]["tasks"][name]["metrics"]["per_example"] for s in seeds}
        got = summary[name] = {c: versus(mine, sep[c].get(name, {})) for c in SEPARATE}
        cells = [(f"{g['mean']:.1f}", f"{g['diff']:+.1f} [{g['lo']:+.1f}, {g['hi']:+.1f}]", g["within_10"]) if g
                 else ("—", "—", "—") for g in (got["lora"], got[CONFIG])]
        metric = joint[seeds[0]]["tasks"][name]["metric"]
        metric = {"bleu": "sentence BLEU", "chrf": "sentence chrF"}.get(metric, metric)  # per-example means
        lines.append(f"| {name} | {metric} | {cells[0][0]} | {cells[1][0]} | "
                     f"{mean_std([statistics.fmean(v) for v in mine.values()])[0]:.1f} | {cells[1][1]} | {cells[1][2]} | "
                     f"{cells[0][1]} | {cells[0][2]} |")
    one, hours = joint[seeds[0]], sum(r["cpu_seconds"] for r in joint.values()) / 3600
    trainable = {c: sum(next(iter(r.values()))["trainable"] for r in sep[c].values()) for c in SEPARATE}
    separate = Path(cfg.out).resolve()
    where = separate.relative_to(ROOT) if separate.is_relative_to(ROOT) else separate
    text = "\n".join([
        (f"**Small-scale reproduction.** {one['model']} ({one['dtype']} base), rank {RANK} on q/k/v. Joint: one TL6 "
         f"across the {len(names)} tasks, {one['steps']} steps x batch {one['batch']} of mixed rows ({one['n_train']} "
         "training examples per task, each seen once, as in the separate runs), each task's u and v at its swept TL6 "
         f"rate, A and B at their median ({one['lr_shared']:g}). Separate: the parts in `{where}`, same seeds, test "
         f"sets and training examples. Seeds {', '.join(map(str, seeds))}; mean over seeds; differences with a 95 % "
         "paired bootstrap interval (test examples and seeds paired); \"within 10 %\" allows 10 % of the separate "
         "config's mean."), "", *lines, "",
        (f"Trainable parameters: joint {one['trainable']:,} in all, one more task adds {one['per_task']:,}; separate "
         f"TL6 {trainable[CONFIG]:,} in all ({len(sep[CONFIG])} adapters), separate LoRA {trainable['lora']:,} "
         f"({len(sep['lora'])} adapters)."),
        (f"The joint runs took {hours:.2f} CPU-hours of process time in all ({len(seeds)} seeds, training and "
        "evaluation)."), ""])
    (out / "llm_tasks.md").write_text(text)
    (out / "llm_tasks.json").write_text(json.dumps({"seeds": seeds, "summary": summary, "trainable": one["trainable"],
                                                    "per_task": one["per_task"], "separate_trainable": trainable,
                                                    "cpu_hours": hours}, indent=1))
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(ROOT / "benchmarks/configs/seeded.yaml"))
    ap.add_argument("overrides", nargs="*", help="key=value settings of the run config")
    ap.add_argument("--separate", help="the folder of the separate runs' parts (default: the config file's out)")
    ap.add_argument("--report", action="store_true", help="only write the report of the finished seeds")
    args = ap.parse_args(argv)
    if "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = str(ROOT / "benchmarks/configs/seeded.yaml")
    given = [a for a in args.overrides if a.startswith("out=")]
    try:  # the separate runs' config; the joint run writes to its own out
        cfg = load_config(args.config, [a for a in args.overrides if not a.startswith("out=")])
        if args.separate:
            cfg = cfg.model_copy(update={"out": args.separate})
        cells = grid.cells(cfg)
        no = [t.name for t in cfg.tasks if (t.name, CONFIG, RANK) not in cells]
        if no:
            raise ConfigError(f"the joint run takes each task's {CONFIG} r{RANK} rate and compares with its separate "
                              f"runs: the config's cells lack {CONFIG} r{RANK} for {', '.join(no)}")
        tying.load_spec(CONFIG, tasks=[task_key(t.name) for t in cfg.tasks])  # the task names a spec allows
        cfg, rates = experiment.prepare(cfg)  # threads set, every input checked
        missing = [t.name for t in cfg.tasks if rates(t.name, CONFIG, RANK)[0] is None]
        if missing:
            raise ConfigError(f"no {CONFIG} r{RANK} rate for {', '.join(missing)}: run the sweep "
                              f"(benchmarks/reproduce.py {args.config} stage=sweep) or give rates.lr")
    except TyingError as e:
        sys.exit(f"error: {e}")
    out = Path(given[-1].partition("=")[2] if given else ROOT / "benchmarks/results/llm-tasks")
    want = wanted(cfg, rates)

    def run_seed(seed: int) -> dict:
        start = time.process_time()
        row = joint_part(cfg, want, seed, out)
        return {**row, "cpu_seconds": time.process_time() - start}

    items = [(joint_name(seed), out / "parts" / f"{joint_name(seed)}.json", lambda row: is_current(row, want),
              lambda seed=seed: run_seed(seed)) for seed in cfg.seeds]
    rows = parts.drive(items, "joint seeds", joint_line, only_done=args.report)  # --report: the finished seeds only
    joint = {seed: row for seed, row in zip(cfg.seeds, rows) if row is not None}
    if not joint:
        sys.exit(f"error: no finished joint seed at these settings under {out / 'parts'}")
    print(report(cfg, rates, joint, out))


if __name__ == "__main__":
    main()
