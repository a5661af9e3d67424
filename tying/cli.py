"""The ``tying`` command: ``inspect``, ``count``, ``budget`` and ``export-peft`` on meta-device models, and
``compress-peft`` on LoRA folders."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SelectorError, SpecError, TyingError
from .planner import plan
from .spec import load_spec


def meta_model(name_or_path: str):
    from .integrations.meta_models import meta_model  # the command line is a front end over the transformers bridge

    return meta_model(name_or_path)


def _models() -> str:
    from .integrations.meta_models import REGISTRY

    return f"one of {', '.join(REGISTRY)}, or a transformers config.json"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=_models())
    p.add_argument("--spec", required=True, help="preset name (e.g. lora, tl6, vera) or YAML path")
    p.add_argument("--rank", type=int, default=None, help="override the spec's rank")
    _tasks_option(p)


def _tasks_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=_task_names, default=None,
                   help="make the spec multi-task: a number N (tasks t0..tN-1) or names a,b,c; factors shared "
                        "across layers are shared across the tasks too (docs/multitask.md)")


def _task_names(text: str) -> list[str]:
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError("give at least one task")
        return [f"t{i}" for i in range(int(text))]
    return text.split(",")


def _inspect(args) -> None:
    print(plan(meta_model(args.model), load_spec(args.spec, rank=args.rank, tasks=args.tasks)).summary())


def _count(args) -> None:
    model = meta_model(args.model)
    spec = load_spec(args.spec, rank=args.rank, tasks=args.tasks)
    counts = plan(model, spec).counts
    memory = _memory(model, spec, args) if args.memory else None
    if args.json:
        print(json.dumps({**counts.to_dict(), **({"memory": memory} if memory else {})}, indent=2))
        return
    print(f"{'factor':<8} {'trainable':>12} {'frozen':>12} {'groups':>7}")
    for f, row in counts.by_factor.items():
        print(f"{f:<8} {row['trainable']:>12,} {row['frozen']:>12,} {row['groups']:>7}")
    print(f"{'total':<8} {counts.trainable:>12,} {counts.frozen:>12,}")
    if counts.tasks:
        print(f"{counts.tasks} tasks; one more task adds {counts.per_task:,} trainable parameters")
    if memory:
        _print_memory(memory, args)


def _memory(model, spec, args) -> dict[str, dict[str, int]]:
    """Predicted peak training memory per process of the spec and of PEFT LoRA at the spec's rank (docs/memory.md)."""
    from .integrations.memory import predict_memory

    kw = {"dtype": args.dtype, "quant": args.quant, "batch": args.batch, "seq": args.seq, "processes": args.processes,
          "checkpointing": args.checkpointing, "rank": spec.adapter.rank,
          "overhead": None if args.overhead_mb is None else round(args.overhead_mb * 1e6)}
    return {"tying": predict_memory(model, spec, **kw).to_dict(),
            "peft-lora": predict_memory(model, "peft-lora", **kw).to_dict()}


def _print_memory(memory: dict, args) -> None:
    print(f"\npeak training memory per process, MB ({args.dtype}, base {args.quant}, batch {args.batch} x {args.seq} "
          f"tokens, {args.processes} process{'es' if args.processes > 1 else ''}, gradient checkpointing "
          f"{'on' if args.checkpointing else 'off'}; PEFT LoRA on q/k/v at the same rank):")
    print(f"{'component':<12} {'tying':>12} {'peft-lora':>12}")
    for k in memory["tying"]:
        print(f"{k:<12} {memory['tying'][k] / 1e6:>12,.1f} {memory['peft-lora'][k] / 1e6:>12,.1f}")


BUDGET_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _budget(args) -> None:
    from .integrations import transformers as tx
    from .spec import preset_names

    model, rows, names = meta_model(args.model), [], {}
    tx.targets(model, args.targets)  # an unknown target set or model family: one error, not an empty table
    for preset in preset_names():  # aliases (tl6 = tied-ABuv, ...) are one entry; the pool family at default knobs
        try:
            names.setdefault(load_spec(preset, **({"tasks": args.tasks} if args.tasks else {})).model_dump_json(),
                             []).append(preset)
        except SpecError:  # a preset that needs a knob the command line does not give (mtl-lora: tasks)
            continue
    for preset in (" = ".join(n) for n in names.values()):
        first = preset.split(" = ")[0]
        targets = args.targets if tx.default_target_set(load_spec(first)) == "attn_qkv" else "attention"
        counts = []
        for rank in BUDGET_RANKS:
            try:
                counts.append((rank, plan(model, tx.spec(model, first, targets, rank=rank, tasks=args.tasks)).counts))
            except SpecError as e:  # a rank larger than a module allows; anything else is the user's to see
                if isinstance(e, SelectorError) or "adapter.rank" not in str(e):
                    raise
        if not counts:
            continue
        if len({(c.trainable, c.frozen) for _, c in counts}) == 1:  # the rank does not matter (ia3): one row
            counts = [("—", counts[0][1])]
        rows += [{"preset": preset, "rank": rank, "trainable": c.trainable, "frozen": c.frozen,
                  **({"per_task": c.per_task} if args.tasks else {})}
                 for rank, c in counts if c.trainable <= args.max_params]
    rows.sort(key=lambda r: (r["trainable"], r["preset"], str(r["rank"]).zfill(4)))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print(f"no preset fits a budget of {args.max_params:,} trainable parameters on {args.model} "
              f"(targets {args.targets})")
        return
    more = f" {'per task':>10}" if args.tasks else ""
    tasks = f"; {len(args.tasks)} tasks, factors shared across layers shared across tasks" if args.tasks else ""
    print(f"{'preset':<20} {'rank':>5} {'trainable':>12} {'frozen':>12}{more}   (targets {args.targets}; prefix presets: "
          f"attention modules; budget {args.max_params:,}{tasks})")
    for r in rows:
        more = f" {r['per_task']:>10,}" if args.tasks else ""
        print(f"{r['preset']:<20} {r['rank']:>5} {r['trainable']:>12,} {r['frozen']:>12,}{more}")


def _export_peft(args) -> None:
    from .integrations.peft import export_peft

    out = export_peft(meta_model(args.model), args.out, adapter=args.adapter, base_model_name_or_path=args.base_model,
                      task=args.task)
    print(f"wrote a PEFT LoRA adapter to {out}")


def _compress_peft(args) -> None:
    from .integrations.compress import compress_peft

    folders = {}
    for item in args.adapters:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder or name in folders:
            raise TyingError(f"give each LoRA as NAME=FOLDER with distinct names; got {item!r}")
        folders[name] = folder
    report = compress_peft(folders, args.out, args.rank, core=args.core, share=args.share)
    print(f"wrote a {len(folders)}-task tied adapter (rank {args.rank}; exact from rank {report['exact_at']}) to "
          f"{args.out}; relative error of each task's update:")
    for t, row in report["tasks"].items():
        print(f"  {t:<24} {row['relative_error']:.2e}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tying`` console command."""
    parser = argparse.ArgumentParser(prog="tying", description="Tied adapters for any PyTorch model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the plan: sites, tie groups, shapes, trained or frozen")
    _common(p)
    p.set_defaults(run=_inspect)
    p = sub.add_parser("count", help="trainable and frozen adapter parameters")
    _common(p)
    p.add_argument("--json", action="store_true", help="one JSON object: trainable, frozen, by_factor, by_group")
    m = p.add_argument_group("memory", "--memory: predicted peak training memory per process, for the spec and for "
                             "PEFT LoRA at its rank (docs/memory.md)")
    m.add_argument("--memory", action="store_true", help="predict peak training memory")
    m.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 (default), float16, float32")
    m.add_argument("--quant", default="none", help="base quantization: none (default), nf4, int8")
    m.add_argument("--batch", type=int, default=1, help="sequences per process (default 1)")
    m.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    m.add_argument("--processes", type=int, default=1, help="FSDP processes sharing the model (default 1)")
    m.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    m.add_argument("--overhead-mb", type=float, default=None, help="fixed runtime overhead in MB (default: the one "
                   "measured on a CPU; add a GPU's CUDA context)")
    p.set_defaults(run=_count)
    p = sub.add_parser("budget", help="presets and ranks whose trainable count fits a budget, sorted by count")
    p.add_argument("--model", required=True, help=_models())
    p.add_argument("--max-params", type=int, required=True, help="the budget of trainable parameters")
    p.add_argument("--targets", default="attn_qkv", help="target set: attn_qkv (default), attn, mlp, all_linear")
    p.add_argument("--json", action="store_true", help="a JSON list of {preset, rank, trainable, frozen}")
    _tasks_option(p)
    p.set_defaults(run=_budget)
    p = sub.add_parser("export-peft", help="materialise a tied adapter as a per-module PEFT LoRA adapter")
    p.add_argument("--model", required=True, help=_models())
    p.add_argument("--adapter", required=True, help="folder written by tying.save_adapter")
    p.add_argument("--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record in adapter_config.json")
    p.add_argument("--task", default=None, help="of a multi-task adapter, the one task to export")
    p.set_defaults(run=_export_peft)
    p = sub.add_parser("compress-peft", help="many PEFT LoRAs of one base into one tied multi-task adapter")
    p.add_argument("adapters", nargs="+", metavar="NAME=FOLDER", help="each LoRA folder with its task name")
    p.add_argument("--rank", type=int, required=True, help="the shared rank (exact from the sum of the LoRAs' ranks; with --share layers, times the layers)")
    p.add_argument("--out", required=True, help="folder for the tied adapter (spec.yaml, adapter.safetensors, "
                   "compression.json)")
    p.add_argument("--core", choices=("full", "diag"), default="full", help="each task's small factor: an r x r "
                   "core (full) or an r-vector (diag)")
    p.add_argument("--share", choices=("module", "layers"), default="module", help="one pair of shared bases per "
                   "module, or per projection across all layers")
    p.set_defaults(run=_compress_peft)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (TyingError, ImportError) as e:
        print(f"tying: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
