"""Run one Tied-LoRA experiment, described by one typed YAML config: zero-shot, LoRA, TL5, TL6, the VeRA-like
setting and the rest of the tied-* family, fine-tuned and scored on real tasks with a real pretrained model.

    python benchmarks/reproduce.py CONFIG.yaml [key=value ...]

    python benchmarks/reproduce.py benchmarks/configs/quick.yaml               # SNLI; zero-shot, lora, tl6, vera; ~3 min
    python benchmarks/reproduce.py benchmarks/configs/full.yaml                # five tasks, nine configs (~7 h)
    python benchmarks/reproduce.py benchmarks/configs/gpu.yaml                 # five tasks x four configs, bf16, one GPU
    python benchmarks/reproduce.py benchmarks/configs/seeded.yaml shard=1/2    # 3 seeds, per-task rates (and shard=2/2)
    python benchmarks/reproduce.py benchmarks/configs/paper.yaml stage=plan    # the paper's grid: exact counts, no weights
    python benchmarks/reproduce.py my.yaml model.name=/models/llama out=runs/llama stage=report

A config names the model (+ dtype, device), the tasks (built-in names or JSONL files with their metric), the configs
(presets or spec files), ranks, seeds, training sizes, where rates come from (``rates``: given, a table, or a sweep)
and the output folder; every key: tying.integrations.llm.runconfig and docs/llm.md. ``stage``: all (sweep, train,
report; the default), sweep, train, report, plan. ``shard=K/N`` runs every N-th part (a SLURM array task or one
process per GPU under torchrun with ``shard=auto``); the report merges all shards' parts. Each part is written to
<out>/parts/ as soon as it finishes and reused by a later run at the same settings (``resume``); the logic lives in
the LLM kit (tying.integrations.llm: runconfig, grid, parts, rates, report, experiment).
"""

from __future__ import annotations

import sys

from tying.integrations.llm import experiment
from tying.integrations.llm.runconfig import load_config

from tying.errors import TyingError


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return
    if "=" in args[0]:
        sys.exit(f"error: the first argument is a config file (benchmarks/configs/*.yaml), not {args[0]!r}")
    try:
        cfg, rates = experiment.prepare(load_config(args[0], args[1:]))
    except (TyingError, ValueError) as e:  # bad input: nothing has been written yet
        sys.exit(f"error: {e}")
    try:
        experiment.execute(cfg, rates)
    except TyingError as e:  # e.g. a non-finite loss: the part that hit it was not written
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
