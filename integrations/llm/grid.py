"""An experiment grid as a file (models x tasks x configs x ranks x seeds), checked and counted without weights.

    grid = load_grid("benchmarks/configs/paper.yaml")
    rows = plan_parts(grid)    # one dict per part: model, task, config, rank, seed, trainable, tokens, gpu_hours

Each model names a ``shape`` (a :data:`tying.integrations.meta_models.REGISTRY` name or a transformers ``config.json``)
that gives exact trainable counts on the meta device, and a ``checkpoint`` (a folder, hub id or
.gguf file for :func:`.models.load_model`) that running the grid needs. Every config and rank is
planned on every model here, so an unknown config or a rank larger than a module allows is an error
before anything runs. Estimates: tokens = steps x batch x grad_accum x ``tokens_per_example``;
GPU-hours = 4 x (base parameters) x tokens / (``gpu.peak_tflops`` x ``gpu.mfu``), i.e. forward plus
the activation-gradient backward of a frozen base (no weight gradients), evaluation not counted.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ...errors import TyingError

TRAINING_KEYS = {"steps": 50, "batch": 4, "grad_accum": 1, "n_train": 1000, "n_test": 100, "max_len": 256,
                 "dtype": "bfloat16", "data": None, "tokens_per_example": 200}
TOP_KEYS = {"models", "tasks", "configs", "ranks", "seeds", "training", "gpu", "lr"}


class GridError(TyingError, ValueError):
    """A grid file is malformed, or names a config, rank, task or model that cannot run."""


def load_grid(path: str | Path) -> dict:
    """The grid file at ``path``, checked for its keys and filled with :data:`TRAINING_KEYS` defaults."""
    p = Path(path)
    if not p.is_file():
        raise GridError(f"--plan {path}: no such grid file; see benchmarks/configs/paper.yaml for the format")
    raw = yaml.safe_load(p.read_text()) or {}
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("models", "tasks", "configs", "ranks"):
        if not raw.get(key):
            raise GridError(f"{path}: '{key}' is missing or empty")
    for name, m in raw["models"].items():
        if not isinstance(m, dict) or "shape" not in m:
            raise GridError(f"{path}: models.{name} needs a 'shape' (e.g. llama2-7b or a config.json path) "
                            "and a 'checkpoint' (your weights; may be empty for --plan)")
    bad = set(raw.get("training", {})) - set(TRAINING_KEYS)
    if bad:
        raise GridError(f"{path}: unknown training key(s) {', '.join(sorted(bad))}; allowed: {', '.join(TRAINING_KEYS)}")
    grid = {**raw, "seeds": raw.get("seeds") or [0], "training": {**TRAINING_KEYS, **raw.get("training", {})},
            "gpu": {"name": "H100", "peak_tflops": 989.0, "mfu": 0.3, **(raw.get("gpu") or {})}, "lr": raw.get("lr") or {}}
    grid["path"] = str(p)
    return grid


def plan_parts(grid: dict) -> list[dict]:
    """One row per (model, task, config, rank, seed) with exact trainable counts from meta-device models.

    Raises :class:`GridError` naming the file, config and model for an unknown config or a rank that a
    module cannot take.
    """
    from tying.integrations.meta_models import meta_model

    import tying

    from .. import transformers as tx

    t, gpu = grid["training"], grid["gpu"]
    tokens = t["steps"] * t["batch"] * t["grad_accum"] * t["tokens_per_example"]
    rows = []
    for name, m in grid["models"].items():
        try:
            model = meta_model(str(m["shape"]))
        except TyingError as e:
            raise GridError(f"{grid['path']}: models.{name}.shape: {e}") from e
        base = sum(p.numel() for p in model.parameters())
        hours = 4 * base * tokens / (gpu["peak_tflops"] * 1e12 * gpu["mfu"]) / 3600
        counts = {}
        for config in grid["configs"]:
            for rank in grid["ranks"]:
                try:
                    counts[config, rank] = tying.count(model, tx.spec(model, config, rank=rank)).trainable
                except TyingError as e:
                    raise GridError(f"{grid['path']}: config {config!r} at rank {rank} on models.{name}: {e}") from e
        for task in grid["tasks"]:
            for seed in grid["seeds"]:
                for rank in grid["ranks"]:
                    rows += [{"model": name, "task": task, "config": c, "rank": rank, "seed": seed,
                              "trainable": counts[c, rank], "tokens": tokens, "gpu_hours": round(hours, 4)}
                             for c in grid["configs"]]
    return rows


def table(rows: list[dict], grid: dict) -> str:
    """A readable summary of :func:`plan_parts`: one line per (model, config, rank), and the totals."""
    seen, lines = {}, ["| model | config | rank | trainable | parts | tokens/part | GPU-h/part |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        seen.setdefault((r["model"], r["config"], r["rank"]), []).append(r)
    for (model, config, rank), rs in seen.items():
        lines.append(f"| {model} | {config} | {rank} | {rs[0]['trainable']:,} | {len(rs)} | {rs[0]['tokens']:,} | "
                     f"{rs[0]['gpu_hours']:.3f} |")
    total = sum(r["gpu_hours"] for r in rows)
    lines.append(f"\n{len(rows)} parts; about {total:.1f} GPU-hours on {grid['gpu']['name']} at "
                 f"{grid['gpu']['mfu']:.0%} of {grid['gpu']['peak_tflops']:g} TFLOP/s (training only; an estimate)")
    return "\n".join(lines)
