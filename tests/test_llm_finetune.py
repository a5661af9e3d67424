"""integrations.llm.finetune on transformers' Trainer: same steps as a plain loop, exact gradient accumulation."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from test_tasks import char_tokenizer
from tying.integrations import transformers as tx
from tying.integrations.llm import finetune as ft
from tying.integrations.llm.tasks import collate, encode_example

import tying

EXAMPLES = [{"prompt": f"{i} + {i} =", "answer": str(2 * i) * (1 + i % 3)} for i in range(10)]


def adapted(tok):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    tying.apply_(model, tx.spec(model, "lora", rank=4))
    return model


def plain_loop(model, tok, steps, lr, batch_size, seed):
    """The reference: AdamW on the answer loss in finetune's example order, linear schedule, clipping at 1."""
    data = [encode_example(tok, e["prompt"], e["answer"]) for e in EXAMPLES]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (steps - s) / steps)
    order, losses = ft.stream_order(len(data), steps * batch_size, seed), []
    model.train()
    for step in range(steps):
        loss = ft.answer_loss(model, collate([data[i] for i in order[step * batch_size:(step + 1) * batch_size]],
                                             tok.pad_token_id))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_trainer_takes_the_same_steps_as_a_plain_loop(one_thread):
    tok = char_tokenizer()
    a, b = adapted(tok), adapted(tok)
    expected = plain_loop(a, tok, steps=6, lr=1e-2, batch_size=4, seed=1)
    hist = ft.finetune(b, EXAMPLES, tok, steps=6, lr=1e-2, batch_size=4, seed=1, progress=False)
    assert hist["loss"] == pytest.approx(expected, rel=1e-4)
    assert hist["lr"] == pytest.approx([1e-2 * (6 - s) / 6 for s in range(6)])
    for pa, pb in zip(a.tying_bank.parameters(), b.tying_bank.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=2e-4)  # Adam amplifies rounding of near-zero grads
    assert not b.training and hist["tokens"] > 0 and hist["trainable"] == sum(
        p.numel() for p in b.parameters() if p.requires_grad)


def test_accumulation_equals_the_larger_batch(one_thread):
    """2 x 2 accumulated averages over the answer tokens of all four examples, like a batch of 4."""
    tok = char_tokenizer()
    a, b = adapted(tok), adapted(tok)
    big = ft.finetune(a, EXAMPLES, tok, steps=3, lr=1e-2, batch_size=4, seed=0, progress=False)
    acc = ft.finetune(b, EXAMPLES, tok, steps=3, lr=1e-2, batch_size=2, grad_accum=2, seed=0, progress=False,
                      gradient_checkpointing=True)
    assert acc["loss"] == pytest.approx(big["loss"], rel=1e-4)
    for pa, pb in zip(a.tying_bank.parameters(), b.tying_bank.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=2e-4)  # Adam amplifies rounding of near-zero grads
    flag = "is_activation_checkpointing" if hasattr(type(b), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(b, flag)  # finetune leaves the model as it came


def test_bad_schedule_raises_before_training():
    tok = char_tokenizer()
    model = adapted(tok)
    before = {k: v.clone() for k, v in model.tying_bank.state_dict().items()}
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        ft.finetune(model, EXAMPLES, tok, steps=2, schedule="cosin", progress=False)
    assert all(torch.equal(v, model.tying_bank.state_dict()[k]) for k, v in before.items())
