"""Worker for tests/test_distributed.py's Trainer runs: TyingTrainer on a tiny Llama, one process or several
under torchrun (gloo, CPU), the same global batch of 4 sequences per step in a fixed order.

    python tests/dist_trainer_worker.py OUT [--steps N] [--save-steps K] [--resume CHECKPOINT]
    torchrun --nproc_per_node 2 tests/dist_trainer_worker.py OUT ...
"""

import argparse
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--tasks", action="store_true", help="a multi-task adapter; each example names its task")
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_llama()
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
        args.out, max_steps=args.steps, per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=1e-2,
        report_to=[], use_cpu=True, seed=0, ddp_backend="gloo" if world > 1 else None, logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500)
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(str(Path(args.out) / "final"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        leave()


if __name__ == "__main__":
    main()
