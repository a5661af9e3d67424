"""Adapter folders written by tying 0.1.0 before the core was opened (commit 892bfe8: kinds and module types
hard-wired) load into this version with the same keys and compute the logits that version computed.

The folders in tests/data/adapters-0.1.0 hold a tiny random Llama's adapters (conftest.tiny_llama, randomized
factors) and ``expected.safetensors``: the tokens and the logits 0.1.0 gave for them."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

import tying

DATA = Path(__file__).parent / "data" / "adapters-0.1.0"


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.iterdir()))
def test_an_adapter_written_by_0_1_0_loads_and_computes_the_same(name):
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    tying.load_adapter(model, DATA / name)
    expected = load_file(str(DATA / name / "expected.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=expected["tokens"]).logits
    assert torch.allclose(logits, expected["logits"], atol=1e-5), (logits - expected["logits"]).abs().max()
    assert set(tying.bank_of(model).state_dict()) == set(load_file(str(DATA / name / "adapter.safetensors")))
