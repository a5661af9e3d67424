"""Worker for tests/test_distributed.py's Trainer runs: TyingTrainer on a tiny Llama, one process or several
under torchrun (gloo, CPU), the same global batch of 4 sequences per step in a fixed order.

    python tests/dist_trainer_worker.py OUT [--steps N] [--save-steps K] [--resume CHECKPOINT] [--fsdp full|sharded]
    torchrun --nproc_per_node 2 tests/dist_trainer_worker.py OUT ...
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from torch.utils.data import SequentialSampler

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama
from dist_worker import leave
from tying.integrations.transformers import adapter_trainer

import tying

GLOBAL_BATCH = 4


class Trainer(adapter_trainer(transformers.Trainer)):
    def _get_train_sampler(self, *args, **kwargs):  # one order for every world size: the global batches match
        return SequentialSampler(self.train_dataset)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None:
            force_fsdp(self)


def force_fsdp(trainer) -> None:
    """accelerate takes its FSDP path only on accelerators (``accelerate/state.py``: MULTI_CPU is not among the
    types it turns into FSDP), so on this CPU the same arguments would silently run DDP. Set what it would have set
    on a GPU: the distributed type FSDP (in the shared state every AcceleratorState copies) and the plugin the
    Trainer built from ``fsdp_config``; from here on the Trainer's and accelerate's own FSDP2 code runs on gloo:
    ``fsdp2_prepare_model``, ``save_fsdp_optimizer`` / ``load_fsdp_optimizer``, ``get_state_dict``."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    PartialState._shared_state["distributed_type"] = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def nf4_llama(out: Path):
    """tiny_llama saved in bfloat16 (once per process, before any Trainer) and loaded 4-bit as QLoRA + FSDP users
    load it: nf4 weights packed in bfloat16 storage (so that FSDP2 shards them with the other bfloat16 parameters),
    bfloat16 compute."""
    base = out / f"base-{os.environ.get('RANK', '0')}"
    if not base.is_dir():
        tiny_llama().to(torch.bfloat16).save_pretrained(base)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.bfloat16,
                                                             device_map="cpu")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--then-resume", default=None, metavar="CHECKPOINT",
                    help="after the run, resume OUT/CHECKPOINT in this process into OUT/resumed (a new model)")
    ap.add_argument("--tasks", action="store_true", help="a multi-task adapter; each example names its task")
    ap.add_argument("--nf4", action="store_true", help="a 4-bit base (bitsandbytes nf4, bfloat16 quant storage)")
    ap.add_argument("--fsdp", choices=["full", "sharded"], default=None,
                    help="FSDP2 through the Trainer (blocks and root), with this state_dict_type")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.nf4:
        nf4_llama(out)
    run(args, out, args.resume)
    if args.then_resume:
        run(args, out / "resumed", str(out / args.then_resume), save_steps=0)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        leave()


def run(args, out: Path, resume: str | None, save_steps: int | None = None) -> None:
    """Train a new model (resuming ``resume``) into ``out``; the adapter at the end goes to ``out/final``, and what
    the run saw to ``out/facts-<rank>.json``."""
    save_steps = args.save_steps if save_steps is None else save_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_llama() if not args.nf4 else nf4_llama(Path(args.out))
    spec = tying.load_spec("tl6", rank=4)
    if args.tasks:  # TL6 across tasks: A and B shared by the tasks, u and v per task
        data = spec.model_dump(mode="json")
        for f in "AB":
            data["adapter"]["factors"][f]["tie"].append("task")
        spec = tying.load_spec({**data, "tasks": ["a", "b", "c"]})
    tying.apply_(model, spec)
    ids = torch.randint(0, 100, (4 * GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1)).tolist()
    columns = {"input_ids": ids, "labels": ids}
    if args.tasks:  # every batch mixes tasks, and each process's half of it too
        columns["task"] = ["abc"[i % 3] for i in range(len(ids))]
    data = Dataset.from_dict(columns)
    targs = transformers.TrainingArguments(
        str(out), max_steps=args.steps, per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=1e-2,
        report_to=[], use_cpu=True, seed=0, ddp_backend="gloo" if world > 1 else None, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        **({} if args.fsdp is None else {"fsdp": "full_shard", "fsdp_config": {
            "fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "state_dict_type": f"{args.fsdp.upper()}_STATE_DICT"}}))
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))
    inner = trainer.accelerator.unwrap_model(trainer.model)
    q = inner.model.layers[0].self_attn.q_proj
    facts = {"model": type(trainer.model).__name__, "factor": type(next(tying.bank_of(inner).parameters())).__name__,
             "base_weight": type(q.base.weight).__name__, "base_layer": type(q.base).__name__,
             "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    (out / f"facts-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
