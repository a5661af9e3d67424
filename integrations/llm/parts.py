"""One part of an experiment (load -> adapt -> train -> evaluate -> row), the checks before a run, and the run:
a shard's parts written one by one to ``<out>/parts/``, finished ones reused (resume), by the driver every run of
parts shares (:func:`drive`; benchmarks/llm_tasks.py's joint seeds too).

    cfg = prepare(load_config("my.yaml"))   # every input checked, defaults filled; nothing written
    run(cfg, rates.Rates(cfg))              # this shard's parts
    row = run_part(grid.parts(cfg)[1], Path(cfg.out), lr=1e-2)   # or one part by hand
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tying

from ...errors import TyingError
from ...files import write_text
from . import grid, hf_data
from .adapting import Adapted, adapt, peft_settings, spec_of, trainable_of  # noqa: F401 (parts.adapt etc.)
from .finetune import finetune, generate_answers
from .models import BUILTIN, DTYPES, check_device, default_device, load_model, load_tokenizer, resolve
from .progress import Progress, clock
from .records import Part
from .runconfig import ConfigError, RunConfig
from .tasks import default_max_new_tokens, default_metric, get_task, load_jsonl_examples, metric_of

LEGACY = {"model": "smollm2-135m", "dtype": "float32", "data": None, "max_len": 256, "grad_accum": 1,
          "metric": "exact_match", "max_new_tokens": 32}  # what rows written before these keys existed ran at


def evaluate(model, tok, task, test, batch_size: int = 16, progress: bool = False) -> dict:
    """Greedy answers to ``test`` scored by ``task``'s metric; with its first five answers (``progress``: a bar)."""
    length = task.max_new_tokens or default_max_new_tokens(tok, [e["answer"] for e in test])
    preds = generate_answers(model, tok, [e["prompt"] for e in test], max_new_tokens=length, batch_size=batch_size,
                             postprocess=task.postprocess, threads=1, progress=progress)  # a 2nd thread
    # gains little when decoding small batches and made decoding 10x slower here while another process held a core
    return {**task.score(preds, task.references(test)), "examples": [p for p in preds[:5]]}


def data_of(part: Part, task, val: int = 0) -> tuple[list, list]:
    """A part's (train, test) examples; with ``val``, (train, ``val`` held-out *training* examples) for the rate
    sweep. The test split is fixed by the run's ``n_test`` either way, so held-out examples are never test examples."""
    train, test = task.load(n_train=part.n_train + val, n_test=part.n_test, seed=part.seed)
    return (train[:part.n_train], train[part.n_train:]) if val else (train, test)


def run_part(part: Part, out: Path, lr: float | None = None, val: int = 0) -> dict:
    """Fine-tune (or not, for zero-shot) one config on one task and score it on the test split (or, with ``val``,
    on that many held-out training examples, for the rate sweep); the row is the part plus what it measured."""
    task = get_task(part.task, part.data, part.metric, part.max_new_tokens)
    train, test = data_of(part, task, val)
    with _loading_bars(sys.stderr.isatty()):
        model, tok = load_model(part.model, dtype=part.dtype, device=part.device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    row = {**part.row(), "model_name": resolve(part.model).description, "cpus": cpus}
    if part.config == "zero-shot":
        row.update(trainable=0, seconds=0.0)
    else:
        if lr is None:
            raise ValueError(f"{part.name}: no learning rate given")
        adapted = adapt(model, part.config, part.rank, part.seed)
        hist = finetune(model, train, tok, steps=part.steps, lr=lr, batch_size=part.batch, seed=part.seed,
                        schedule="linear", warmup=max(1, part.steps // 10), max_len=part.max_len,
                        grad_accum=part.grad_accum, gradient_checkpointing=part.gradient_checkpointing,
                        progress=sys.stderr.isatty())
        if not val:
            adapted.save(out / "adapters" / part.name)
        row.update(trainable=adapted.trainable, lr=lr, seconds=hist["seconds"], tokens=hist["tokens"],
                   loss_first=sum(hist["loss"][:5]) / 5, loss_last=sum(hist["loss"][-5:]) / 5,
                   loss=[round(x, 4) for x in hist["loss"]])
    start = time.perf_counter()
    row["metrics"] = evaluate(model, tok, task, test, part.gen_batch, progress=sys.stderr.isatty())
    row["eval_seconds"] = time.perf_counter() - start
    row["score"] = row["metrics"][task.metric]
    return row


@contextlib.contextmanager
def _loading_bars(shown: bool):
    """transformers' bars while loading a model (weights, GGUF tensors) only where ``shown``: in a log they are a
    line of carriage returns per part. Restored afterwards."""
    from transformers.utils import logging as hf_logging

    hide = hf_logging.is_progress_bar_enabled() and not shown
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def is_current(row: dict, cfg: RunConfig, rates) -> bool:
    """Whether a finished part belongs to this run: its task and seed are the run's, its settings the run's, and
    (trained) its rate is the one ``rates`` gives its cell today. Zero-shot does not train: only its model, test set
    and scoring matter."""
    task = cfg.task(row.get("task"))
    if task is None or row.get("seed") not in cfg.seeds or row.get("n_test") != cfg.n_test_of(task):
        return False
    row = {**LEGACY, **row}
    if row["model"] == BUILTIN["smollm2-135m"]:  # rows from before the model was configurable
        row["model"] = "smollm2-135m"
    want = grid.parts(cfg.model_copy(update={"tasks": [task], "seeds": [row["seed"]]}))[0]
    keys = ["model", "dtype", "data", *(["metric", "max_new_tokens"] if task.name.endswith(".jsonl") else [])]
    if any(row[k] != getattr(want, k) for k in keys):
        return False
    if row["config"] == "zero-shot":
        return True
    return all(row[k] == getattr(want, k) for k in grid.TRAINING) and row.get("lr") == rates(
        task.name, row["config"], row["rank"])[0]


Item = tuple[str, Path, Callable[[dict], bool], Callable[[], dict]]  # (name, file, is_current(row), run() -> row)


def drive(items: list[Item], what: str, line: Callable[[dict], str], resume: bool = True,
          only_done: bool = False) -> list[dict | None]:
    """Run ``items`` one by one, each row written to its file as soon as it finishes; with ``resume`` an item whose
    file holds a row that ``is_current`` accepts is kept ("done already") and not rerun; with ``only_done`` nothing
    runs. Prints one line per finished item (``line(row)``) with the time left (:class:`.progress.Progress`; on a
    terminal also a bar). Returns each item's row as its file holds it, None for one that did not run."""
    rows: list[dict | None] = [None] * len(items)
    todo = []
    for i, (_, f, current, _) in enumerate(items):
        row = json.loads(f.read_text()) if resume and f.exists() else None
        if row is not None and current(row):
            print(f"done already: {f.name}")
            rows[i] = row
        elif not only_done:
            todo.append(i)
    with Progress(len(todo), what) as bar:
        for i in todo:
            name, f, _, run_item = items[i]
            bar.begin(name)
            text = json.dumps(run_item(), indent=1)
            f.parent.mkdir(parents=True, exist_ok=True)
            write_text(f, text)
            rows[i] = json.loads(text)
            bar.done(line(rows[i]))
    return rows


def run(cfg: RunConfig, rates) -> None:
    """Run this shard's parts into ``<out>/parts/`` (:func:`drive`); with ``resume`` a part already there at these
    settings and rate (:func:`is_current`) is skipped."""
    out = Path(cfg.out)

    def run_one(p: Part) -> dict:
        return run_part(p, out, lr=None if p.config == "zero-shot" else rates(p.task, p.config, p.rank)[0])

    items = [(p.name, out / "parts" / f"{p.name}.json", lambda row: is_current(row, cfg, rates), lambda p=p: run_one(p))
             for p in grid.shard(cfg, grid.parts(cfg))]
    drive(items, "parts", lambda row: part_line(row, metric_of(cfg, row["task"])), resume=cfg.resume)


def part_line(row: dict, metric: str) -> str:
    """A finished part in one line: its name, score, rate and trainable count, and the time it took."""
    trained = f", lr {row['lr']:g}, {row['trainable']:,} trainable" if row.get("lr") is not None else ""
    took = row.get("seconds", 0.0) + row.get("eval_seconds", 0.0)
    return f"{grid.part_name(row)}: {metric} {row['score']:.2f}{trained} ({clock(took)})"


def prepare(cfg: RunConfig) -> RunConfig:
    """Every input that could fail later, checked before anything is written or trained (the output folder, the
    model, device and dtype, each task and its data, each config at each rank on the model's meta-device twin where
    its config is readable); returns ``cfg`` with the device, dtype and each JSONL task's metric and generation
    length filled in, printing a note for each default it chose."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {out} is a file; give a folder for the results")
    made = next(p for p in (out, *out.absolute().parents) if p.exists())  # the folder the run's folders go under
    if not made.is_dir() or not os.access(made, os.W_OK | os.X_OK):
        why = "is a file" if not made.is_dir() else "is not writable"
        raise ConfigError(f"out {out} cannot be created: {made} {why}; give a folder that can")
    device = cfg.model.device or default_device()
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one process per GPU under torchrun
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device})})
    dtype = grid.dtype_of(cfg)
    src = resolve(cfg.model.name)
    check_device(device, DTYPES[dtype])
    tasks, tok = [], None
    for t in cfg.tasks:
        get_task(t.name, cfg.data, t.metric)
        if t.name.endswith(".jsonl"):
            examples, n_test = load_jsonl_examples(t.name), cfg.n_test_of(t)
            trained = any(task == t.name for task, _, _ in grid.cells(cfg))
            if len(examples) < n_test + trained:  # a malformed line fails above, a short file here
                raise ConfigError(f"{t.name}: {len(examples)} usable lines, but n_test {n_test} takes that many for the "
                                  f"test set{' and training needs at least one more' if trained else ''}; give more "
                                  "lines or a smaller n_test")
            answers = [e["answer"] for e in examples]
            if t.metric is None:
                metric, why = default_metric(answers)
                print(f"note: {t.name}: no metric given; {why}", flush=True)
                t = t.model_copy(update={"metric": metric})
            if t.max_new_tokens is None:
                tok = tok or load_tokenizer(cfg.model.name)
                length = default_max_new_tokens(tok, answers)
                print(f"note: {t.name}: no max_new_tokens given; {length}, room for its longest answer", flush=True)
                t = t.model_copy(update={"max_new_tokens": length})
        elif cfg.data is not None:
            hf_data.load_splits(t.name, cfg.data)
        tasks.append(t)
    meta = _meta(src)
    for config, rank in dict.fromkeys((c, r) for _, c, r in grid.cells(cfg)):
        try:
            if meta is not None:
                trainable_of(meta, config, rank)
            elif peft_settings(config) is None:
                tying.load_spec(config, rank=rank)
        except TyingError as e:
            raise TyingError(f"configs {config} at rank {rank} on {cfg.model.name}: {e}") from e
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype}), "tasks": tasks})


def _meta(src):
    """The model on the meta device (no weights) for checks, or None where its config is not at hand (GGUF)."""
    from tying.integrations.meta_models import meta_model
    if src.kind == "builtin":
        return meta_model(src.name)
    if src.kind == "folder":
        return meta_model(str(Path(src.name) / "config.json"))
    return None
