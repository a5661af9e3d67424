"""The parts of a run config: its (task, config, rank) cells, its parts (a cell at a seed, plus zero-shot once per
task), a shard's share of them, and the plan: every part with its exact trainable count on a meta-device model.

    cells(cfg)          # [(task, config, rank), ...], task by task
    parts(cfg)          # one records.Part per part, seed by seed: what run_part needs and what its row records
    shard(cfg, items)   # the K-th of N shards: every N-th item from the K-th (cfg.shard = "K/N")
    plan_rows(cfg)      # parts with trainable counts, tokens and GPU-hours; loads no weights

Plan estimates: tokens = steps x batch x grad_accum x ``plan.tokens_per_example``; GPU-hours = 4 x (base
parameters) x tokens / (``plan.peak_tflops`` x ``plan.mfu``), i.e. forward plus the activation-gradient backward of
a frozen base (no weight gradients); evaluation and the rate sweep not counted.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import TyingError
from .adapting import trainable_of  # as a run adapts: presets on q/k/v, a spec file with its own targets
from .records import Part, name_of
from .runconfig import RunConfig

TRAINING = ("steps", "n_train", "batch", "max_len", "grad_accum")  # a trained part is reused only where these match


class GridError(TyingError, ValueError):
    """A config names a model shape, config or rank that cannot be planned."""


def cells(cfg: RunConfig) -> list[tuple[str, str, int]]:
    """Every (task, config, rank) of the run: tasks x ranks x configs, then the ``also`` cells, task by task."""
    out = []
    for t in cfg.tasks:
        out += [(t.name, c, r) for r in cfg.ranks for c in cfg.configs]
        out += [(t.name, c, r) for a in cfg.also if t.name in a.tasks for r in a.ranks for c in a.configs]
    return list(dict.fromkeys(out))


def dtype_of(cfg: RunConfig) -> str:
    """The base's dtype: the config's, else bfloat16 on cuda and float32 elsewhere (docs/llm.md, precision)."""
    device = cfg.model.device or "cpu"
    return cfg.model.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def parts(cfg: RunConfig) -> list[Part]:
    """Every part, seed by seed (a stop leaves whole seeds); zero-shot once per task, at the first seed (greedy
    decoding of a fixed test set is the same at every seed). A part holds what its row records."""
    base = {"steps": cfg.steps, "n_train": cfg.n_train, "batch": cfg.batch, "model": cfg.model.name,
            "dtype": dtype_of(cfg), "data": cfg.data, "max_len": cfg.max_len, "grad_accum": cfg.grad_accum,
            "device": cfg.model.device or "cpu", "gradient_checkpointing": cfg.gradient_checkpointing,
            "gen_batch": cfg.gen_batch}
    out = []
    for seed in cfg.seeds:
        for t in cfg.tasks:
            at = {**base, "n_test": cfg.n_test_of(t), "seed": seed, "task": t.name}
            if t.name.endswith(".jsonl"):
                at.update(metric=t.metric, max_new_tokens=t.max_new_tokens)
            if seed == cfg.seeds[0]:
                out.append(Part(**at, config="zero-shot", rank=0))
            out += [Part(**at, config=c, rank=r) for task, c, r in cells(cfg) if task == t.name]
    return out


def part_name(row: dict) -> str:
    """A finished row's file name (a part's is :attr:`.records.Part.name`)."""
    return name_of(row["task"], row["config"], row["rank"], row["seed"])


def shard(cfg: RunConfig, items: list) -> list:
    """This process's share: every N-th item from the K-th (``shard: K/N``); the N shares are disjoint and cover all."""
    k, n = cfg.shards
    return items[k - 1::n]


def plan_rows(cfg: RunConfig) -> list[dict]:
    """One row per trained part with its exact trainable count from a meta-device twin of ``model.shape`` (else of the
    model's own config.json or built-in name); raises :class:`GridError` naming the config and rank that fail."""
    from tying.integrations.meta_models import meta_model


    shape = cfg.model.shape or cfg.model.name
    if Path(shape).is_dir():
        shape = str(Path(shape) / "config.json")
    try:
        model = meta_model(shape)
    except TyingError as e:
        raise GridError(f"model.shape {shape}: {e}; give a meta-model name (llama2-7b) or a config.json") from e
    base = sum(p.numel() for p in model.parameters())
    tokens = cfg.steps * cfg.batch * cfg.grad_accum * cfg.plan.tokens_per_example
    hours = 4 * base * tokens / (cfg.plan.peak_tflops * 1e12 * cfg.plan.mfu) / 3600
    counts = {}
    for _, config, rank in cells(cfg):
        if (config, rank) not in counts:
            try:
                counts[config, rank] = trainable_of(model, config, rank)
            except TyingError as e:
                raise GridError(f"config {config!r} at rank {rank} on {shape}: {e}") from e
    return [{"model": Path(shape).stem if shape.endswith(".json") else shape, "task": p.task, "config": p.config,
             "rank": p.rank, "seed": p.seed, "trainable": counts[p.config, p.rank], "tokens": tokens,
             "gpu_hours": round(hours, 4)} for p in parts(cfg) if p.config != "zero-shot"]


def table(rows: list[dict], cfg: RunConfig) -> str:
    """A readable summary of :func:`plan_rows`: one line per (model, config, rank), and the totals."""
    seen, lines = {}, ["| model | config | rank | trainable | parts | tokens/part | GPU-h/part |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        seen.setdefault((r["model"], r["config"], r["rank"]), []).append(r)
    for (model, config, rank), rs in seen.items():
        lines.append(f"| {model} | {config} | {rank} | {rs[0]['trainable']:,} | {len(rs)} | {rs[0]['tokens']:,} | "
                     f"{rs[0]['gpu_hours']:.3f} |")
    total = sum(r["gpu_hours"] for r in rows)
    lines.append(f"\n{len(rows)} parts; about {total:.1f} GPU-hours on {cfg.plan.gpu} at {cfg.plan.mfu:.0%} of "
                 f"{cfg.plan.peak_tflops:g} TFLOP/s (training only; an estimate)")
    return "\n".join(lines)
