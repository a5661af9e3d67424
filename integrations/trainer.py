"""The Trainer's checkpoints for adapted models: :class:`AdapterCheckpoints` (and :func:`adapter_trainer`, which mixes it
into any ``transformers.Trainer`` subclass; ``tying.integrations.transformers.TyingTrainer`` is the Trainer with it).

Every checkpoint is the adapter folder beside the Trainer's optimizer, scheduler and RNG states, and resuming loads it
back. Under FSDP2 (or tensor parallelism) the adapter's shards alone are gathered, never the whole model, and the
optimizer's state is accelerate's FSDP format (whole or sharded, as ``state_dict_type`` says); docs/
integrations-distributed.md says what is collective.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .. import sharded
from ..engine import bank_of
from ..errors import ServingError, ShardingError
from ..serving import adapters
from ..state import SPEC_FILE, adapter_tensors, load_adapter, save_adapter, write_adapter


class AdapterCheckpoints:
    """Mixin for ``transformers.Trainer`` and its subclasses: every checkpoint (``save_steps``,
    ``save_model()``, the best model) is the adapter folder (``spec.yaml`` + ``adapter.safetensors``, with the
    spec's ``train_modules``) beside the Trainer's optimizer, scheduler and RNG states, and resuming loads it
    back (a spec that differs from the model's raises before anything changes). Use :class:`TyingTrainer`, or
    :func:`adapter_trainer` to mix it into another Trainer class.

    A quantized model passes the Trainer's "purely quantized model" check when it carries trainable tying
    factors (transformers recognises only PEFT's adapters; the check runs once, in ``__init__``).

    A multi-task adapter (docs/multitask.md) trains on mixed batches: each example names its task in a ``task``
    column (the task's name, or its position in the spec's ``tasks``); the column passes around the data collator
    and routes each row of a batch to its task."""

    def __init__(self, model=None, *args, **kwargs):
        bank = getattr(model, "tying_bank", None)
        trainable = bank is not None and any(p.requires_grad for p in bank.parameters())
        flag = "_hf_peft_config_loaded"  # what transformers' check reads for "trainable adapters are attached"
        vouch = trainable and getattr(model, "is_quantized", False) and not getattr(model, flag, False)
        if vouch:
            setattr(model, flag, True)
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if vouch:
                setattr(model, flag, False)
        self.tasks = bank.spec.tasks if bank is not None else None
        if self.tasks:
            self.data_collator = _TaskCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.tasks and TASK_COLUMN not in self._signature_columns:  # kept by remove_unused_columns
            self._signature_columns = [*self._signature_columns, TASK_COLUMN]

    def _routed(self, model, inputs: dict):
        """The routing of a multi-task adapter's batch by its ``task`` column (taken out of ``inputs``)."""
        if TASK_COLUMN not in inputs:
            raise ServingError(f"the model's adapter has tasks {self.tasks}: every example needs a {TASK_COLUMN!r} "
                               "column (the task's name or its position in the spec's tasks)")
        names = inputs.pop(TASK_COLUMN)
        names = [self.tasks[int(n)] if not isinstance(n, str) else n for n in names]
        return adapters(self.accelerator.unwrap_model(model), names)

    def training_step(self, model, inputs, *args, **kwargs):  # forward and backward; also under a subclass's loss
        if not self.tasks:
            return super().training_step(model, inputs, *args, **kwargs)
        with self._routed(model, inputs):
            return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        if not self.tasks:
            return super().prediction_step(model, inputs, *args, **kwargs)
        with self._routed(model, inputs):
            return super().prediction_step(model, inputs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self.accelerator.unwrap_model(self.model)
        bank = getattr(model, "tying_bank", None)
        if bank is None or not sharded.is_sharded(model, bank):
            return super().save_model(output_dir, _internal_call)
        # FSDP2 or tensor parallelism: every process gathers the adapter's shards alone (never the whole model, as
        # the Trainer's full state dict would), process 0 writes; also with a sharded state_dict_type
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(model, output_dir)
        if self.args.should_save:
            self._save_extras(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not getattr(self, "is_fsdp_enabled", False):
            return super()._save_optimizer_and_scheduler(output_dir)
        # FSDP: the Trainer would add the whole model (save_fsdp_model); its adapter is the folder save_model wrote.
        # The optimizer's state is accelerate's (full or sharded, as the plugin says; collective), the scheduler's
        # process 0's.
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_extras(self, output_dir: str) -> None:
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        if not state_dict:  # None, or DeepSpeed's {} when it could not gather: the model's own tensors
            save_adapter(model, output_dir)
        else:  # FSDP: the full state dict the Trainer gathered on this process; the model's own tensors are shards
            write_adapter(output_dir, bank_of(model).spec, adapter_tensors(bank_of(model), state_dict))
        self._save_extras(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not (Path(resume_from_checkpoint) / SPEC_FILE).is_file():  # a full checkpoint of a plain Trainer
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._check_optimizer_state(Path(resume_from_checkpoint))
        # the Trainer's own checkpoint: its train_modules are this run's, so they may replace the model's
        load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint,
                     replace_modules=True)

    def _check_optimizer_state(self, ckpt: Path) -> None:
        """Refuse a checkpoint whose optimizer state this run cannot read, before anything is loaded: FSDP writes
        accelerate's format (``optimizer.bin``, or a sharded ``optimizer_0/`` folder), other runs ``optimizer.pt``
        (the Trainer would load the adapter and then fail on the optimizer). Either kind resumes on any number of
        processes: the adapter folder holds whole tensors, and FSDP's optimizer state is whole or resharded."""
        fsdp_state = (ckpt / "optimizer.bin").is_file() or (ckpt / "optimizer_0").is_dir()
        plain_state = (ckpt / "optimizer.pt").is_file()
        fsdp = bool(getattr(self, "is_fsdp_enabled", False))
        if fsdp_state != fsdp and (fsdp_state or plain_state):
            saved, now = ("under FSDP (optimizer.bin / optimizer_0/)", "is not") if fsdp_state else \
                ("without FSDP (optimizer.pt)", "is")
            raise ShardingError(
                f"{ckpt} was saved {saved}, and this run {now} an FSDP run, so the Trainer could not read its "
                "optimizer state; nothing was loaded. Resume it with the setup it was saved with (the number of "
                "processes may differ), or start a new run from its adapter alone (tying.load_adapter(model, "
                "checkpoint))")

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not (Path(best) / SPEC_FILE).is_file():
            return super()._load_best_model()
        load_adapter(self.accelerator.unwrap_model(self.model), best, replace_modules=True)


TASK_COLUMN = "task"


class _TaskCollator:
    """A data collator that takes the ``task`` column out of each example, collates the rest with ``inner`` and
    puts the tasks back as a list (collators drop or choke on string columns)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        tasks = [f.get(TASK_COLUMN) for f in features]
        if any(t is None for t in tasks):
            raise ServingError(f"an example has no {TASK_COLUMN!r} column; a multi-task adapter needs each example's "
                               "task (its name or its position in the spec's tasks)")
        batch = self.inner([{k: v for k, v in f.items() if k != TASK_COLUMN} for f in features])
        batch[TASK_COLUMN] = [t.item() if isinstance(t, torch.Tensor) else t for t in tasks]
        return batch


def adapter_trainer(trainer_class: type) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass, e.g. ``trl.SFTTrainer``) with adapter-only
    checkpoints (:class:`AdapterCheckpoints`)."""
    return type(f"Tying{trainer_class.__name__}", (AdapterCheckpoints, trainer_class), {})
