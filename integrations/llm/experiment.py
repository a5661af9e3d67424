"""A run config, run: check everything, then the rate sweep, the parts and the report (``stage`` picks which).

    from tying.integrations.llm import experiment, runconfig
    cfg = runconfig.load_config("my.yaml", ["out=runs/mine"])
    cfg, rates = experiment.prepare(cfg)    # every input checked; nothing written yet
    experiment.execute(cfg, rates)          # sweep -> this shard's parts -> the report of every shard's parts
"""

from __future__ import annotations

import torch

from . import grid, parts, report
from .rates import Rates, sweep
from .runconfig import ConfigError, RunConfig


def prepare(cfg: RunConfig) -> tuple[RunConfig, Rates | None]:
    """The config with its defaults filled and the rate policy, after every check (:func:`.parts.prepare`,
    :meth:`.rates.Rates.check`); raises before anything is written. A stage ``plan`` writes nothing and loads no
    weights: it is checked as it is planned."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.stage == "plan":
        return cfg, None
    cfg = parts.prepare(cfg)
    rates = Rates(cfg)
    rates.check(cfg)
    return cfg, rates


def execute(cfg: RunConfig, rates: Rates | None) -> None:
    """Run the stage of a prepared config: ``plan`` prints the parts with exact counts; ``sweep`` sweeps this
    shard's cells; ``train`` runs this shard's parts and writes the report; ``all`` does both; ``report`` only
    writes the report (of every current part in ``<out>``, whichever shard ran it)."""
    if cfg.stage == "plan":
        print(grid.table(grid.plan_rows(cfg), cfg))
        return
    if cfg.stage in ("all", "sweep"):
        sweep(cfg, rates)
        rates = Rates(cfg)  # the picks just made
    if cfg.stage in ("all", "train"):
        todo = rates.unswept(cfg, [(p.task, p.config, p.rank) for p in grid.shard(cfg, grid.parts(cfg))
                                   if p.config != "zero-shot"])
        if todo:
            raise ConfigError(f"the sweep gave no rate for {', '.join(todo)}: widen rates.sweep.grid, turn on "
                              "rates.sweep.extend, or give those cells a rate in rates.lr")
        parts.run(cfg, rates)
    if cfg.stage != "sweep":
        report.write(cfg, rates)
