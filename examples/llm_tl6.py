"""The paper's TL6 on a transformers causal LM (llm_tl6.yaml). Needs `pip install -e ".[hf]"`.

By default a tiny random Llama (GQA: k/v narrower than q) learns a random bigram language (each
token has one fixed successor), so the script runs offline in seconds; with a random base and only the
attention inputs adapted the loss falls slowly, which is not what a pretrained base does. ``--model DIR`` loads a local Llama-family checkpoint instead
(``from_pretrained``; for SmolLM2-135M see docs/integrations-transformers.md).

    python examples/llm_tl6.py [--steps 80] [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import tying

SPEC = Path(__file__).with_suffix(".yaml")


def build_model(layers: int = 4, seed: int = 0, path: str | None = None):
    """A local checkpoint, or a random Llama: hidden 64, 4 query and 2 key/value heads, vocab 128."""
    if path:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg)


def chain_batch(n: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Sequences of a random bigram language: a random first token, then ``next = successor[token]``."""
    successor = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    tokens = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))]
    for _ in range(length - 1):
        tokens.append(successor[tokens[-1]])
    ids = torch.stack(tokens, dim=1)
    return {"input_ids": ids, "labels": ids}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--model", default=None, help="a local transformers checkpoint folder (Llama family)")
    args = p.parse_args(argv)
    if args.model is None:
        torch.set_num_threads(1)  # the tiny random model runs fastest on one thread
    model = build_model(path=args.model)
    vocab = model.config.vocab_size

    spec = tying.load_spec(SPEC)  # or tying.load_spec("tl6", rank=8): the same spec as a preset
    print(tying.plan(model, spec).summary())
    counts = tying.apply_(model, spec)
    print(f"trainable {counts.trainable:,}: one A, one B per projection, u and v per layer")

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**chain_batch(16, 16, vocab, seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    model.eval()
    test = chain_batch(4, 16, vocab, seed=10_000)["input_ids"]
    with torch.no_grad():
        logits = model(test).logits
        tying.merge_(model)  # fold the update into the base weights: no adapter cost at inference
        merged_same = torch.allclose(model(test).logits, logits, atol=1e-4)
        tying.unmerge_(model)
    print(f"merged model gives the same logits: {merged_same}")

    with tempfile.TemporaryDirectory() as out:
        tying.save_adapter(model, out)  # A and B written once, not once per layer
        size = sum(f.stat().st_size for f in Path(out).iterdir())
        fresh = build_model(path=args.model)
        tying.load_adapter(fresh, out)
        with torch.no_grad():
            reload_same = torch.allclose(fresh.eval()(test).logits, logits, atol=1e-5)
    print(f"adapter folder {size:,} bytes; reloaded adapter gives the same logits: {reload_same}")
    return {"trainable": counts.trainable, "loss_first": losses[0], "loss_last": losses[-1],
            "merged_same": merged_same, "reload_same": reload_same}


if __name__ == "__main__":
    main()
