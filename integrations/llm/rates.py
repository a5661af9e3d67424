"""The rate policy: where each (task, config, rank) cell of a run gets its learning rate, and the sweep that finds one.

A cell's rate is, in this order: ``rates.lr`` (``TASK/CONFIG/rRANK``, ``TASK/CONFIG``, ``CONFIG/rRANK``,
``CONFIG``); else the rate ``table``'s, where the table was swept on the cell's task; else the sweep's pick (with
``rates.sweep``, the default: a task without swept rates gets swept); else, with the sweep turned off, the table's
rate for another task, with a warning naming the table; else none, an error before anything runs.

The sweep scores each cell at each rate of its grid on held-out *training* examples (:func:`.parts.run_part` with
``val``), seed 0, into one JSON file that runs side by side add to; :func:`best_lr` is the one rule that picks.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from ...files import write_text
from . import grid
from .progress import Progress, clock
from .runconfig import ConfigError, Rate, RunConfig, _Spec, rate_key_parts
from .stats import next_rate
from .tasks import load_jsonl_examples, metric_of


class RateTable(_Spec):
    """A rate table file: the rates of a sweep done once, reused for the task(s) it was swept on."""

    swept_on: list[str] = Field(min_length=1)
    lr: dict[str, Rate]


def cell_key(task: str, config: str, rank: int) -> str:
    return f"{Path(task).name}/{Path(config).stem}/r{rank}"


def best_lr(scores: dict[float, float]) -> float:
    """THE rule that picks a rate from one sweep cell (every task, config and rank alike): the highest
    validation score; on a tie, the smaller rate."""
    return max(sorted(scores), key=scores.__getitem__)  # max keeps the first of equal scores


def at_edge(scores: dict[float, float]) -> bool:
    """Whether the picked rate is the grid's smallest or largest, so the grid must be extended."""
    return best_lr(scores) in (min(scores), max(scores))


def no_signal(scores: dict[float, float]) -> bool:
    """Whether every rate of a cell (two or more) scored the same (a task at its floor): no rate is best and
    no direction to extend in; the sweep stops there and the cell has no rate."""
    return len(scores) > 1 and len(set(scores.values())) == 1


def load_table(path: str) -> RateTable:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"rates.table {path}: no such rate table (e.g. benchmarks/configs/rates/snli.yaml)")
    try:
        table = RateTable.model_validate(yaml.safe_load(p.read_text()))
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"rates.table {path}: not a rate table {{swept_on: [tasks], lr: {{CONFIG: rate}}}} "
                          f"({str(e).splitlines()[0]})") from None
    for key in table.lr:
        if rate_key_parts(key)[0] is not None:
            raise ConfigError(f"rates.table {path}: lr.{key}: a table's keys are CONFIG or CONFIG/rRANK")
    return table


def sweep_file(cfg: RunConfig) -> Path:
    return Path(cfg.rates.sweep.file or Path(cfg.out) / "lr_sweep.json")


def sweep_settings(cfg: RunConfig) -> dict:
    """What a sweep result was measured at; results at other settings are not this sweep's (``n_test``: n_val)."""
    s = cfg.rates.sweep
    return {"steps": s.steps or cfg.steps, "n_train": s.n_train or cfg.n_train, "n_test": s.n_val,
            "batch": s.batch or cfg.batch, "model": cfg.model.name, "dtype": grid.dtype_of(cfg), "data": cfg.data}


def _stored(cfg: RunConfig) -> tuple[dict, list[dict]] | None:
    """(settings, results) in the sweep file, or None without one (or with the sweep off)."""
    if cfg.rates.sweep is None or not sweep_file(cfg).exists():
        return None
    old = json.loads(sweep_file(cfg).read_text())
    legacy = {"model": "smollm2-135m", "dtype": "float32", "data": None}  # files from before these were recorded
    return ({k: old.get("settings", {}).get(k, legacy.get(k)) for k in sweep_settings(cfg)},
            old.get("results", []))


def sweep_results(cfg: RunConfig) -> list[dict]:
    """The finished sweep runs at this sweep's settings (read afresh: sweeps side by side add up)."""
    stored = _stored(cfg)
    return stored[1] if stored and stored[0] == sweep_settings(cfg) else []


def scores_of(results: list[dict], task: str, config: str, rank: int) -> dict[float, float]:
    key = (Path(task).name, Path(config).stem, rank)
    return {r["lr"]: r["score"] for r in results
            if (Path(r["task"]).name, Path(r["config"]).stem, r.get("rank", 8)) == key}


def why_not(scores: dict[float, float]) -> str | None:
    """Why a sweep cell gives no rate yet (None: it gives one)."""
    if not scores:
        return "not swept"
    if no_signal(scores):
        return "no signal: every rate scored the same"
    return "best at the edge" if at_edge(scores) else None


class Rates:
    """The rate of every cell under a config's policy: ``rates(task, config, rank) -> (rate or None, source)``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.table = load_table(cfg.rates.table) if cfg.rates.table else None
        self.results = sweep_results(cfg)

    def __call__(self, task: str, config: str, rank: int) -> tuple[float | None, str]:
        t, c = Path(task).name, Path(config).stem
        for key in (f"{t}/{c}/r{rank}", f"{t}/{c}", f"{c}/r{rank}", c):
            if key in self.cfg.rates.lr:
                return self.cfg.rates.lr[key], "rates.lr"
        table = self.table and next((self.table.lr[k] for k in (f"{c}/r{rank}", c) if k in self.table.lr), None)
        if table is not None and t in self.table.swept_on:
            return table, "table"
        if self.cfg.rates.sweep is not None:
            scores = scores_of(self.results, task, config, rank)
            return (None if why_not(scores) else best_lr(scores)), "sweep"
        if table is not None:
            return table, "table, swept on another task"
        return None, "none"

    def check(self, cfg: RunConfig) -> None:
        """Before anything runs: every cell of the run has a rate or gets one from the sweep (else an error naming
        the cells); a sharded run to train has its sweep finished; a table's rates reused for a task they were not
        swept on print a warning naming the table."""
        sources = {cell: self(*cell) for cell in grid.cells(cfg)}
        missing = [cell_key(*c) for c, (_, src) in sources.items() if src == "none"]
        if missing:
            raise ConfigError(f"no learning rate for {', '.join(missing)}: give rates.lr, a rates.table swept on the "
                              "task, or turn the sweep on (rates.sweep)")
        n_train = sweep_settings(cfg)["n_train"] if cfg.rates.sweep else 0
        for task in dict.fromkeys(c[0] for c, (lr, src) in sources.items() if src == "sweep" and lr is None):
            pool = len(load_jsonl_examples(task)) - cfg.n_test_of(cfg.task(task)) if task.endswith(".jsonl") else None
            if pool is not None and pool <= n_train:
                raise ConfigError(f"{task}: the sweep trains on {n_train} of the {pool} lines left after the test set "
                                  "and scores held-out ones after those: none would be left; set rates.sweep.n_train "
                                  f"below {pool} (and rates.sweep.n_val) or give more lines")
        reused: dict[str, list[str]] = {}
        for (task, config, rank), (_, src) in sources.items():
            if src == "table, swept on another task":
                reused.setdefault(task, []).append(f"{Path(config).stem} r{rank}")
        for task, which in reused.items():
            print(f"warning: {task}: the rates of {', '.join(which)} come from the table {cfg.rates.table}, swept on "
                  f"{', '.join(self.table.swept_on)}, not on {task}; they may be far from {task}'s best (a sweep: "
                  "set rates.sweep)", flush=True)
        stored = _stored(cfg)
        if stored and stored[0] != (mine := sweep_settings(cfg)) and cfg.stage in ("all", "sweep") and any(
                src == "sweep" and lr is None for lr, src in sources.values()):
            theirs = stored[0]
            differ = ", ".join(f"{k} {theirs[k]} there, {mine[k]} here" for k in mine if theirs[k] != mine[k])
            raise ConfigError(f"rates.sweep.file {sweep_file(cfg)} holds a sweep at other settings ({differ}); this "
                              "sweep would replace it: give this run its own file (rates.sweep.file="
                              f"{Path(cfg.out) / 'lr_sweep.json'}) or its rates (rates.lr)")
        if cfg.stage == "train" or (cfg.stage == "all" and cfg.shards[1] > 1):
            todo = self.unswept(cfg, [(p.task, p.config, p.rank) for p in grid.shard(cfg, grid.parts(cfg))
                                      if p.config != "zero-shot"])
            if todo:
                raise ConfigError(f"shard {cfg.shard}, stage {cfg.stage}: no swept rate yet for {', '.join(todo)}; run "
                                  "stage=sweep (every shard) first, then stage=train")

    def unswept(self, cfg: RunConfig, cells: list[tuple[str, str, int]]) -> list[str]:
        """The cells (with why) whose rate is the sweep's and has no pick yet."""
        out = []
        for cell in dict.fromkeys(cells):
            lr, src = self(*cell)
            if src == "sweep" and lr is None:
                out.append(f"{cell_key(*cell)} ({why_not(scores_of(self.results, *cell))})")
        return out


def sweep(cfg: RunConfig, rates: Rates) -> None:
    """Sweep this shard's share of the cells whose rate is the sweep's (every N-th such cell): seed 0, the sweep's
    steps, batch and n_train, scored on ``n_val`` held-out training examples. Finished runs at the same settings are
    kept and not rerun, so a sweep resumes, runs side by side with another (shards) and grows; with ``extend``, a
    cell whose best rate is at its grid's edge gets the next rate beyond it, until it is not."""
    from .parts import run_part

    todo = [c for c in grid.cells(cfg) if rates(*c)[1] == "sweep"]
    if not todo:
        return
    spec, f, settings = cfg.rates.sweep, sweep_file(cfg), sweep_settings(cfg)
    f.parent.mkdir(parents=True, exist_ok=True)
    mine, results = grid.shard(cfg, todo), sweep_results(cfg)
    counted = {(*c, lr) for c in mine for lr in spec.grid if lr not in scores_of(results, *c)}  # runs announced
    with Progress(len(counted), "sweep") as bar:
        for task, config, rank in mine:
            part = next(p for p in grid.parts(cfg) if (p.task, p.config, p.rank) == (task, config, rank))
            part = replace(part, **{k: settings[k] for k in ("steps", "n_train", "batch")}, seed=0)
            grid_ = sorted(spec.grid)
            while grid_:
                for lr in grid_:
                    if lr in scores_of(sweep_results(cfg), task, config, rank):
                        if (task, config, rank, lr) in counted:  # announced, but a sweep beside this one ran it
                            counted.discard((task, config, rank, lr))
                            bar.grow(-1)
                        continue
                    name = f"{cell_key(task, config, rank)} lr {lr:g}"
                    bar.begin(name)
                    row = run_part(part, Path(cfg.out), lr=lr, val=spec.n_val)
                    new = {"task": task, "config": config, "rank": rank, "lr": lr, "score": row["score"],
                           "seconds": row["seconds"] + row["eval_seconds"], "loss_last": row["loss_last"]}
                    results = [r for r in sweep_results(cfg) if (r["task"], r["config"], r.get("rank", 8), r["lr"])
                               != (task, config, rank, lr)]
                    write_text(f, json.dumps({"settings": settings, "results": [*results, new]}, indent=1))
                    bar.done(f"sweep {name}: {metric_of(cfg, task)} {new['score']:.1f} on {spec.n_val} held-out, "
                             f"loss {new['loss_last']:.3f} ({clock(new['seconds'])})")
                scores = scores_of(sweep_results(cfg), task, config, rank)
                beyond = next_rate(best_lr(scores), up=best_lr(scores) == max(scores))
                extend = spec.extend and at_edge(scores) and not no_signal(scores) and 1e-5 <= beyond <= 1
                grid_ = [beyond] if extend else []
                more = {(task, config, rank, lr) for lr in grid_ if lr not in scores}  # the edge moved: a run more
                counted |= more
                bar.grow(len(more))
    sweep_table(cfg, sweep_results(cfg))


def sweep_table(cfg: RunConfig, results: list[dict]) -> None:
    """lr_sweep.md beside the sweep file: one row per (task, config, rank), one column per rate, and the pick."""
    s, rates = sweep_settings(cfg), sorted({r["lr"] for r in results})
    lines = [(f"LR sweep: {s['steps']} steps x batch {s['batch']} on {s['n_train']} training examples, scored on "
              f"{s['n_test']} held-out *training* examples (never the test split), seed 0, base in {s['dtype']}. "
              "Best: the highest score, the smaller rate on a tie (rates.best_lr, the same rule for every cell)."),
             "", "| task | config | rank | " + " | ".join(f"LR {lr:g}" for lr in rates) + " | best |",
             "|---|---|---|" + "---|" * (len(rates) + 1)]
    for task, config, rank in dict.fromkeys((r["task"], r["config"], r.get("rank", 8)) for r in results):
        scores = scores_of(results, task, config, rank)
        metric = metric_of(cfg, task)
        best = "none (no signal)" if no_signal(scores) else f"{best_lr(scores):g}" + (" (edge: extend)" if at_edge(scores) else "")
        lines.append(f"| {task} ({metric}) | {config} | {rank} | " + " | ".join(
            f"{scores[lr]:.1f}" if lr in scores else "—" for lr in rates) + f" | {best} |")
    write_text(sweep_file(cfg).with_name("lr_sweep.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
