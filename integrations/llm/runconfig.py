"""One experiment, one typed config: a YAML file (``benchmarks/configs/*.yaml``) and ``key=value`` overrides.

    cfg = load_config("benchmarks/configs/quick.yaml", ["out=/tmp/q", "steps=10", "model.dtype=bfloat16"])

The classes below are the whole vocabulary. An unknown key in the file or in an override is an error naming its
YAML path and the closest key; a bad value names its path and what is allowed; both before anything runs.
Override values are YAML (``ranks=[8,64]``, ``rates.sweep=null``); lists and tasks are overridden whole. Paths in
a config (JSONL tasks, spec files, the rate table, ``out``) are relative to the working directory, as on a
command line.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...errors import TyingError
from .metrics import METRICS

Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # the seeds of torch, numpy and Python's random all take it
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
STAGES = ("all", "sweep", "train", "report", "plan")


class ConfigError(TyingError, ValueError):
    """A run config or an override is malformed: an unknown key, a value out of range, a name that does not exist."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """The model: a built-in name, a save_pretrained folder, a hub id or a ``.gguf`` file."""

    name: str = "smollm2-135m"
    shape: str | None = None  # stage=plan without weights: a meta-model name (llama2-7b) or a config.json
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # the frozen base's; None: bfloat16 on cuda, else fp32
    device: str | None = None  # None: cuda, else mps, else cpu


class TaskSpec(_Spec):
    """A built-in task (nli, squad, translation, xsum, gsm8k, dialogsum, hellaswag) or a ``.jsonl`` file of
    ``{"prompt", "answer"}`` lines, which names its ``metric`` and generation length (defaults: from its answers)."""

    name: str
    metric: Literal[tuple(METRICS)] | None = None
    max_new_tokens: Count | None = None
    n_test: Count | None = None  # this task's test examples (default: the run's n_test)

    @property
    def key(self) -> str:
        """The name in part files and rate keys: a JSONL task's file name, not its path."""
        return Path(self.name).name


class Cells(_Spec):
    """More (task, config, rank) cells beyond the run's product of tasks x configs x ranks."""

    tasks: list[str]
    configs: list[str]
    ranks: list[Count]


class Sweep(_Spec):
    """The learning-rate sweep: each cell at each rate of ``grid``, scored on ``n_val`` held-out *training* examples
    (never the test split), seed 0; with ``extend``, a cell whose best rate is at the grid's edge gets the next 3x
    rate beyond it until it is not. steps, batch, n_train: the run's unless given."""

    grid: list[Rate] = [3e-3, 1e-2, 3e-2]
    extend: bool = True
    n_val: Count = 100
    steps: Count | None = None
    batch: Count | None = None
    n_train: Count | None = None
    file: str | None = None  # default: <out>/lr_sweep.json


class Rates(_Spec):
    """Where each (task, config, rank) gets its rate: ``lr`` (keys CONFIG, TASK/CONFIG, each optionally /rRANK),
    else a ``table`` swept on its task, else the ``sweep`` (null: no sweep; then the table, with a warning)."""

    lr: dict[str, Rate] = {}
    table: str | None = None  # a rate table YAML: {swept_on: [tasks], lr: {CONFIG[/rRANK]: rate}}
    sweep: Sweep | None = Sweep()


class PlanSpec(_Spec):
    """stage=plan's estimate: GPU-hours = 4 x base parameters x tokens / (peak_tflops x mfu), training only."""

    gpu: str = "H100 SXM"
    peak_tflops: float = Field(989.0, gt=0)
    mfu: float = Field(0.3, gt=0, le=1)
    tokens_per_example: Count = 200


class RunConfig(_Spec):
    """One experiment: every (task, config, rank, seed) part of it, how each part trains, where its rows go."""

    model: ModelSpec = ModelSpec()
    data: str | None = None  # built-in tasks' source: None packaged offline, hf (the hub), or a local folder
    tasks: list[TaskSpec] = Field(min_length=1)
    configs: list[str] = []  # preset names or spec YAML files; [] runs zero-shot only
    ranks: list[Count] = [8]
    also: list[Cells] = []
    seeds: list[Seed] = Field([0], min_length=1)
    steps: Count = 50
    batch: Count = 4
    n_train: Count = 1000
    n_test: Count = 100
    grad_accum: Count = 1
    max_len: Count = 256
    gradient_checkpointing: bool = False
    gen_batch: Count = 16
    rates: Rates = Rates()
    out: str
    resume: bool = True  # reuse finished parts at these settings; false retrains every part of this run
    stage: Literal[STAGES] = "all"  # all = sweep + train + report; plan: counts and estimates, no weights
    shard: str = "1/1"  # K/N: this process runs every N-th part from the K-th; auto: torchrun's RANK / WORLD_SIZE
    threads: Count | None = None  # torch CPU threads
    plan: PlanSpec = PlanSpec()

    @field_validator("max_len")
    @classmethod
    def _room_for_answers(cls, v):
        if v < 2:
            raise ValueError(f"max_len {v} leaves no answer token to train on (each is predicted from the tokens "
                             "before it, so an example needs a prompt token and an answer token); give at least 2 "
                             "(default 256)")
        return v

    @field_validator("tasks", mode="before")
    @classmethod
    def _names(cls, v):
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @field_validator("shard", mode="before")
    @classmethod
    def _shard(cls, v):
        v = str(v)
        if v == "auto":
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise ValueError("shard auto reads torchrun's RANK and WORLD_SIZE, which are not set; give K/N")
            return f"{int(os.environ['RANK']) + 1}/{os.environ['WORLD_SIZE']}"
        m = re.fullmatch(r"(\d+)/(\d+)", v)
        if not m or not 1 <= int(m[1]) <= int(m[2]):
            raise ValueError(f"shard {v}: give K/N with 1 <= K <= N (e.g. 1/2 and 2/2 for two shards), or auto")
        return v

    @model_validator(mode="after")
    def _names_exist(self):
        keys = [t.key for t in self.tasks]
        if len(set(keys)) < len(keys):
            raise ValueError(f"tasks: a task is named twice ({', '.join(keys)})")
        for i, t in enumerate(self.tasks):
            if not t.name.endswith(".jsonl") and (t.metric or t.max_new_tokens):
                raise ValueError(f"tasks[{i}]: {t.name} is a built-in task with its own metric and length; "
                                 "metric and max_new_tokens are for .jsonl tasks")
        names = [t.name for t in self.tasks]
        for i, cells in enumerate(self.also):
            for t in cells.tasks:
                if t not in names:
                    raise ValueError(f"also[{i}].tasks: {t!r} is not one of tasks{_closest(t, names)}")
        from ...spec import preset_names
        from .tasks import TASKS
        configs = {Path(c).stem for c in [*self.configs, *(c for a in self.also for c in a.configs)]}
        for key in self.rates.lr:
            task, config, _ = rate_key_parts(key)
            if task is not None and task not in keys and task not in TASKS:
                raise ValueError(f"rates.lr.{key}: no task {task!r} in this run{_closest(task, [*keys, *TASKS])}")
            if config not in configs and config not in preset_names():
                raise ValueError(f"rates.lr.{key}: no config {config!r} in this run{_closest(config, sorted(configs))}")
        return self

    @property
    def shards(self) -> tuple[int, int]:
        k, n = self.shard.split("/")
        return int(k), int(n)

    def task(self, name: str) -> TaskSpec | None:
        return next((t for t in self.tasks if t.name == name), None)

    def n_test_of(self, task: TaskSpec) -> int:
        return task.n_test or self.n_test


def rate_key_parts(key: str) -> tuple[str | None, str, int | None]:
    """``TASK/CONFIG/rRANK`` -> (task, config, rank); the task and the rank are optional."""
    parts = key.split("/")
    rank = int(parts.pop()[1:]) if len(parts) > 1 and re.fullmatch(r"r\d+", parts[-1]) else None
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ValueError(f"rates.lr.{key}: give CONFIG, TASK/CONFIG, CONFIG/rRANK or TASK/CONFIG/rRANK")
    return (None, parts[0], rank) if len(parts) == 1 else (parts[0], parts[1], rank)


def _closest(word: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _check_keys(raw, cls: type[BaseModel], path: str, where: str) -> None:
    """Every key of ``raw`` (a mapping read from YAML) is a field of ``cls``, recursively."""
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        if key not in cls.model_fields:
            raise ConfigError(f"{where}: unknown key {path}{key}{_closest(key, cls.model_fields, path)} "
                              f"(keys here: {', '.join(cls.model_fields)})")
        for sub in _models_in(cls.model_fields[key].annotation):
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                _check_keys(item, sub, f"{path}{key}{'' if i is None else f'[{i}]'}.", where)


def _override(raw: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` to ``raw``; a key that is no field of the config is an error."""
    key, eq, text = item.partition("=")
    if not eq or not key:
        raise ConfigError(f"override {item!r}: write KEY=VALUE, e.g. out=runs/mine or model.dtype=bfloat16")
    segs, at = key.split("."), RunConfig
    for i, seg in enumerate(segs[:-1]):  # below a mapping field (rates.lr) the rest is one key: a.jsonl/tl6
        field = at.model_fields.get(seg)
        if field is not None and typing.get_origin(field.annotation) is dict:
            segs = [*segs[:i + 1], ".".join(segs[i + 1:])]
            break
        if field is None or not _models_in(field.annotation):
            break
        at = _models_in(field.annotation)[0]
    *path, last = segs
    cls, node, done = RunConfig, raw, []
    for seg in path:
        if seg not in cls.model_fields:
            raise ConfigError(f"override {item!r}: no key {'.'.join([*done, seg])}"
                              f"{_closest(seg, cls.model_fields, ''.join(f'{d}.' for d in done))}")
        models = _models_in(cls.model_fields[seg].annotation)
        done.append(seg)
        if not models:
            if typing.get_origin(cls.model_fields[seg].annotation) is dict and seg == path[-1]:
                cls = None  # a mapping field (rates.lr): its last segment is a key of its own
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(done)} holds a value, not keys; set it whole")
        else:
            cls = models[0]
        if not isinstance(node.get(seg), dict):
            node[seg] = {}
        node = node[seg]
    if cls is not None and last not in cls.model_fields:
        raise ConfigError(f"override {item!r}: no key {'.'.join([*done, last])}"
                          f"{_closest(last, cls.model_fields, ''.join(f'{d}.' for d in done))}")
    try:
        text_field = cls is not None and cls.model_fields[last].annotation in (str, str | None)
        node[last] = text if text_field and text not in ("", "null", "~") else yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not YAML ({str(e).splitlines()[0]})") from None
    if cls is not None:
        for sub in _models_in(cls.model_fields[last].annotation):
            items = enumerate(node[last]) if isinstance(node[last], list) else [(None, node[last])]
            for i, value in items:
                _check_keys(value, sub, f"{key}{'' if i is None else f'[{i}]'}.", f"override {item!r}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config at ``path`` with ``overrides`` (``key=value``) applied, checked; raises :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file; copy one of benchmarks/configs/*.yaml")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config is a mapping of keys (model, tasks, configs, ...)")
    _check_keys(raw, RunConfig, "", str(path))
    for item in overrides:
        _override(raw, item)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise ConfigError(f"{path}: {'; '.join(problems)}") from None
