"""Supervised fine-tuning on answer tokens (transformers' Trainer) and batched greedy generation for causal LMs.

Independent of the adapter library: the caller decides what is trainable (e.g. ``tying.apply_``)
and passes ``save_fn`` (e.g. ``tying.save_adapter``) to write checkpoints.

    hist = finetune(model, train, tok, steps=200, lr=1e-3, batch_size=8, seed=0)
    preds = generate_answers(model, tok, [e["prompt"] for e in test], max_new_tokens=24)
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ...errors import TyingError
from .records import first_line
from .tasks import collate, encode_example, render_prompt


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        return None
    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, desc="answers", unit="answer", leave=False)


def _schedule(kind: str, steps: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, (steps - step) / max(1, steps - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        raise ValueError(f"unknown schedule {kind!r}; choose linear, constant or cosine")
    return factor


def answer_loss(model, batch: dict, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """The causal-LM loss of ``model(**batch).loss``, with logits computed only where a label follows.

    The LM head (49k x 576 in SmolLM2, about a fifth of the model's FLOPs) then runs on the answer
    tokens instead of every position. With ``num_items`` the summed loss is divided by it (the answer
    tokens of a whole accumulated batch) instead of this batch's count. Falls back to
    ``model(**batch).loss`` for models whose head is not a plain projection of the decoder's last
    hidden state (e.g. logit soft-capping or scaling).
    """
    body, head, cfg = getattr(model, "base_model", None), model.get_output_embeddings(), model.config
    if body is None or body is model or head is None or any(
            getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return model(**batch, **({} if num_items is None else {"num_items_in_batch": num_items})).loss
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = head(hidden[:, :-1][keep])
    if num_items is None:
        return torch.nn.functional.cross_entropy(logits.float(), target[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum") / num_items


def _trainer_classes():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("finetune needs transformers and accelerate: pip install 'tying[hf]'") from e

    from .. import transformers as tx

    class AnswerTrainer(tx.TyingTrainer):
        """Trainer whose loss is :func:`answer_loss` and whose batches follow a fixed, seeded order;
        its checkpoints, where enabled, are adapter folders (``TyingTrainer``)."""

        def __init__(self, *args, order: list[int], **kwargs):
            super().__init__(*args, **kwargs)
            self._order = order

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = answer_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

        def _get_train_sampler(self, *args, **kwargs):
            return self._order

    class Recorder(transformers.TrainerCallback):
        """Per-step loss and LR into the history; ``eval_fn`` every ``eval_every`` steps and at the end."""

        def __init__(self, hist, eval_fn, eval_every, steps):
            self.hist, self.eval_fn, self.eval_every, self.steps = hist, eval_fn, eval_every, steps

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.hist["loss"].append(float(logs["loss"]))
                if not math.isfinite(self.hist["loss"][-1]):  # stop at once: every later step would train on NaN
                    self.hist["nonfinite_step"] = state.global_step
                    control.should_training_stop = True

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            step = state.global_step
            if self.eval_fn is not None and ((self.eval_every and step % self.eval_every == 0) or step == self.steps):
                model.eval()
                self.hist["eval"].append({"step": step, **self.eval_fn(model)})
                model.train()
                print(f"step {step}: {self.hist['eval'][-1]}", flush=True)

    return transformers, AnswerTrainer, Recorder


def _checkpointing(tf, on: bool) -> dict:
    """TrainingArguments for gradient checkpointing; non-reentrant, so a frozen embedding's output needs no grad."""
    if not on:
        return {}
    fields = tf.TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"  # v5 / v4
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def stream_order(n: int, total: int, seed: int) -> list[int]:
    """``total`` example indices: seeded shuffles of ``range(n)`` one after another (a fresh one per epoch)."""
    rng, order = random.Random(seed), []
    while len(order) < total:
        fresh = list(range(n))
        rng.shuffle(fresh)
        order += fresh
    return order[:total]


def finetune(model, train_examples: list[dict], tokenizer, steps: int, lr: float = 1e-3, batch_size: int = 8,
             seed: int = 0, eval_fn: Callable | None = None, eval_every: int | None = None,
             out_dir: str | Path | None = None, save_fn: Callable | None = None, *, max_len: int = 256,
             schedule: str = "linear", warmup: int = 0, weight_decay: float = 0.0, clip: float = 1.0,
             grad_accum: int = 1, gradient_checkpointing: bool = False, progress: bool = True,
             lr_of: Callable[[str], float] | None = None) -> dict:
    """Train the parameters with ``requires_grad`` on answer tokens with transformers' ``Trainer``; returns the history.

    Examples are ``{"prompt", "answer"}`` dicts, encoded once with :func:`encode_example` and drawn
    in a ``seed``-shuffled order, reshuffled every epoch; each optimizer step sees ``batch_size`` x
    ``grad_accum`` examples. The Trainer does device placement (the model's device), accumulation,
    gradient checkpointing and clipping at ``clip``; the loss is :func:`answer_loss` (measured faster
    than the model's full-vocabulary loss, docs/llm.md). AdamW (``weight_decay``), LR ``schedule``
    linear to zero / constant / cosine after ``warmup`` steps. The frozen base keeps its dtype (e.g.
    bfloat16); factors keep theirs (float32 master weights). ``eval_fn(model) -> dict`` runs every
    ``eval_every`` steps and at the end. With ``out_dir``, ``history.json`` is written there and, with
    ``save_fn``, ``save_fn(model, out_dir)`` is called at the end. Examples with a ``task`` key train a multi-task
    adapter on mixed batches (each row routed to its task, docs/multitask.md); ``lr_of(parameter name) -> rate``
    gives parameters their own peak rates (e.g. per task), ``lr`` the rest's and the history's. History: ``{"loss": [per step],
    "lr": [...], "eval": [{"step", ...}], "seconds", "tokens", "trainable"}``.
    """
    if not train_examples:
        raise ValueError("no training examples")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    factor = _schedule(schedule, steps, warmup)  # raises on an unknown schedule before anything runs
    tf, AnswerTrainer, Recorder = _trainer_classes()
    data = [{**encode_example(tokenizer, e["prompt"], e["answer"], max_len), **({"task": e["task"]} if "task" in e else {})}
            for e in train_examples]
    if not any(label != -100 for d in data for label in d["labels"][1:]):  # a token is learnt from those before it
        raise TyingError(f"no example has an answer token to train on (max_len={max_len}): each answer token is "
                         "predicted from the tokens before it, so an example needs room for a prompt token and an "
                         "answer token. Give a larger max_len (default 256), or answers that are not empty")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hist = {"loss": [], "lr": [], "eval": [], "tokens": 0, "trainable": sum(p.numel() for p in params)}

    def collate_(batch):
        out = collate(batch, pad_id)
        hist["tokens"] += int(out["attention_mask"].sum())
        return out

    rates: dict[float, list] = {}
    for n, p in named:
        rates.setdefault(lr if lr_of is None else lr_of(n), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": r} for r, ps in rates.items()], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    hist["lr"] = [lr * factor(s) for s in range(steps)]
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="tying-trainer-") as tmp:
        args = tf.TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
            max_grad_norm=clip or 0.0, logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to="none", seed=seed,
            disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0,
            use_cpu=device.type == "cpu", log_level="warning", **_checkpointing(tf, gradient_checkpointing))
        trainer = AnswerTrainer(model=model, args=args, train_dataset=data, data_collator=collate_,
                                optimizers=(opt, sched), order=stream_order(len(data), steps * batch_size * grad_accum, seed),
                                callbacks=[Recorder(hist, eval_fn, eval_every, steps)])
        trainer.remove_callback(tf.PrinterCallback)  # the history has the losses; the bar (progress=True) shows them
        start = time.perf_counter()
        trainer.train()
        hist["seconds"] = time.perf_counter() - start
    if "nonfinite_step" in hist:
        base = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})
        why = ("the model overflows there (float16's range is small). Train in bfloat16 or float32, or lower the "
               "learning rate" if "float16" in base else "the model's outputs or the update diverged there: lower the learning "
               "rate, or check the base weights and the data")
        raise TyingError(f"the training loss became {hist['loss'][-1]} at step {hist['nonfinite_step']} with the base "
                         f"in {', '.join(base) or 'its dtype'}: {why}; nothing was saved")
    if gradient_checkpointing:  # leave the model as it came (v5 renamed the method)
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if save_fn is not None:
            save_fn(model, out)
        (out / "history.json").write_text(json.dumps(hist, indent=1))
    return hist


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                     postprocess: Callable[[str], str] | None = first_line, progress: bool = False,
                     threads: int | None = None) -> list[str]:
    """Greedy answers to chat-rendered ``prompts``, batched with left padding, in the input order.

    Prompts are sorted by length so batches pad little. Each answer is the decoded new tokens
    (special tokens dropped), passed through ``postprocess`` (default: first non-empty line;
    ``None`` keeps the raw text). ``threads`` sets torch's CPU threads for the call: decoding is
    many small ops, and on a busy 2-core machine ``threads=1`` was about 10x faster than 2.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = [render_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    bar = _progress(len(texts), progress)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                out[i] = postprocess(text) if postprocess else text
            if bar is not None:
                bar.update(len(idx))
    finally:
        torch.set_num_threads(old_threads)
        tokenizer.padding_side = side
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out
