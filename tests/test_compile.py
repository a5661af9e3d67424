"""torch.compile sees no graph break caused by tying (fullgraph=True fails on any break), and the compiled
model (which traces the plain per-site path, not the eager shared down projection) matches eager."""

import copy

import pytest
import torch
from conftest import TINY, randomize_bank, tiny_llama

import tying


def _compiled_matches_eager(model, tokens, backend, atol):
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(input_ids=tokens).logits
    ref = eager(input_ids=tokens).logits
    assert torch.allclose(out.float(), ref.float(), atol=atol)
    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    grads = {k: p.grad for k, p in model.tying_bank.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for k, p in eager.tying_bank.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[k], p.grad, atol=atol, rtol=1e-3), k


@pytest.mark.parametrize("arch", sorted(TINY))
def test_compile_fullgraph_forward_and_backward(arch, tokens):
    model = TINY[arch](layers=1)
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    _compiled_matches_eager(model, tokens, "aot_eager", 1e-5)


def test_compile_fullgraph_bf16_base_fp32_factors(tokens):
    model = tiny_llama(layers=1).to(torch.bfloat16)
    tying.apply_(model, tying.load_spec("tl6", rank=4), dtype=torch.float32)
    randomize_bank(model)
    _compiled_matches_eager(model, tokens, "aot_eager", 1e-2)


@pytest.mark.slow
def test_compile_inductor_fullgraph(tokens):
    """The inductor backend itself (C++ code generation; tens of seconds on a small CPU)."""
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    _compiled_matches_eager(model, tokens, "inductor", 1e-4)
