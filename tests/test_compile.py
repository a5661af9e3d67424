"""torch.compile sees no graph break caused by tying (fullgraph=True fails on any break)."""

import torch
from conftest import randomize_bank, tiny_llama

import tying


def test_compile_fullgraph_forward_and_backward(tokens):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(input_ids=tokens).logits
    assert torch.allclose(out, model(input_ids=tokens).logits, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.tying_bank.parameters() if p.requires_grad)
