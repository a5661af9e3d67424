"""A small supervised fine-tuning loop and batched greedy generation for causal LMs.

Independent of the adapter library: the caller decides what is trainable (e.g. ``tying.apply_``)
and passes ``save_fn`` (e.g. ``tying.save_adapter``) to write checkpoints.

    hist = finetune(model, train, tok, steps=200, lr=1e-3, batch_size=8, seed=0)
    preds = generate_answers(model, tok, [e["prompt"] for e in test], max_new_tokens=24)
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .tasks import collate, encode_example, first_line, render_prompt


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        return None
    return tqdm(total=total, disable=not enabled, dynamic_ncols=True)


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


def answer_loss(model, batch: dict) -> torch.Tensor:
    """The causal-LM loss of ``model(**batch).loss``, with logits computed only where a label follows.

    The LM head (49k x 576 in SmolLM2, about a fifth of the model's FLOPs) then runs on the answer
    tokens instead of every position. Falls back to ``model(**batch).loss`` for models whose head is
    not a plain projection of the decoder's last hidden state (e.g. logit soft-capping or scaling).
    """
    body, head, cfg = getattr(model, "base_model", None), model.get_output_embeddings(), model.config
    if body is None or body is model or head is None or any(
            getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return model(**batch).loss
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def finetune(model, train_examples: list[dict], tokenizer, steps: int, lr: float = 1e-3, batch_size: int = 8,
             seed: int = 0, eval_fn: Callable | None = None, eval_every: int | None = None,
             out_dir: str | Path | None = None, save_fn: Callable | None = None, *, max_len: int = 256,
             schedule: str = "linear", warmup: int = 0, weight_decay: float = 0.0, clip: float = 1.0,
             progress: bool = True) -> dict:
    """Train the parameters with ``requires_grad`` on answer tokens; returns the history.

    Examples are ``{"prompt", "answer"}`` dicts, encoded once with :func:`encode_example` and
    drawn in a ``seed``-shuffled order, reshuffled every epoch. AdamW (``weight_decay``), LR
    ``schedule`` linear to zero / constant / cosine after ``warmup`` steps, gradient-norm clipping
    at ``clip``. ``eval_fn(model) -> dict`` runs every ``eval_every`` steps and at the end. With
    ``out_dir``, ``history.json`` is written there and, with ``save_fn``, ``save_fn(model, out_dir)``
    is called at the end. History: ``{"loss": [per step], "lr": [...], "eval": [{"step", ...}],
    "seconds", "tokens", "trainable"}``.
    """
    if not train_examples:
        raise ValueError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = [encode_example(tokenizer, e["prompt"], e["answer"], max_len) for e in train_examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, steps, warmup))
    hist = {"loss": [], "lr": [], "eval": [], "tokens": 0, "trainable": sum(p.numel() for p in params)}
    order: list[int] = []
    bar = _progress(steps, progress)
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order += fresh
        batch = collate([data[i] for i in order[:batch_size]], pad_id)
        del order[:batch_size]
        loss = answer_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        hist["lr"].append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        hist["loss"].append(loss.item())
        hist["tokens"] += int(batch["attention_mask"].sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{hist['tokens'] / (time.perf_counter() - start):.0f}")
        if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == steps):
            model.eval()
            hist["eval"].append({"step": step, **eval_fn(model)})
            model.train()
            if bar is not None:
                bar.write(f"step {step}: {hist['eval'][-1]}")
    if bar is not None:
        bar.close()
    model.eval()
    hist["seconds"] = time.perf_counter() - start
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
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
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
