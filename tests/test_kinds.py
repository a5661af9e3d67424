"""Adapter kinds beyond LoRA: IA3 and bottleneck adapters, with ties, on a tiny Llama and custom modules."""

import pytest
import torch
from conftest import same_state, snapshot, tiny_gpt2, tiny_llama

import tying
from tying.kinds import NotMergeableError

ATTN = "model.layers.{layer:#}.self_attn.{proj:k_proj|v_proj}"
MLP = "model.layers.{layer:#}.mlp.{proj:down_proj}"


def ia3(tie="layer"):
    return {"targets": [{"select": ATTN}, {"select": MLP}],
            "adapter": {"kind": "ia3", "rank": 1, "factors": {"v": {"tie": [tie] if tie else [], "init": "ones"}}}}


def bottleneck(tie_a=(), train_v=True):
    return {"targets": [{"select": "model.layers.{layer:#}.mlp.down_proj"}],
            "adapter": {"kind": "bottleneck", "rank": 4, "alpha": 8, "factors": {
                "A": {"tie": list(tie_a), "init": {"kind": "kaiming_uniform", "seed": 0}},
                "B": {"init": "zeros"}, "v": {"train": train_v, "init": "ones"}}}}


def test_ia3_counts_tied_and_untied():
    m = tiny_llama()  # 3 layers, k/v out 16, down_proj out 32
    assert tying.count(m, ia3(tie=None)).trainable == 3 * (16 + 16 + 32)
    # v tied across layers: one vector per projection kind
    c = tying.count(m, ia3(tie="layer"))
    assert c.trainable == 16 + 16 + 32 and c.by_factor["v"]["groups"] == 3


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_ia3_identity_start_merge_and_unmerge(model_fn, tokens):
    model = model_fn()
    spec = ia3() if model_fn is tiny_llama else {
        "targets": [{"select": "transformer.h.{layer:#}.{proj:mlp.c_fc|attn.c_attn}"}],
        "adapter": {"kind": "ia3", "rank": 1, "factors": {"v": {"tie": [], "init": "ones"}}}}
    with torch.no_grad():
        ref = model(tokens).logits
    snap = snapshot(model)
    tying.apply_(model, spec)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref)
        for p in model.tying_bank.parameters():
            p.uniform_(0.5, 1.5)
        scaled = model(tokens).logits
        tying.merge_(model)
        assert (model(tokens).logits - scaled).abs().max() < 1e-5
        tying.unmerge_(model)
        assert (model(tokens).logits - scaled).abs().max() < 1e-5
    tying.unapply_(model)
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in snap.items())


def test_ia3_trains_only_v_and_round_trips(tmp_path, tokens):
    model = tiny_llama()
    tying.apply_(model, ia3())
    model(tokens).logits.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == \
        [n for n, _ in model.tying_bank.named_parameters(prefix="tying_bank")]
    tying.save_adapter(model, tmp_path)
    other = tiny_llama()
    tying.load_adapter(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, model(tokens).logits)


def test_bottleneck_zero_start_training_and_no_merge(tmp_path, tokens):
    model = tiny_llama()
    with torch.no_grad():
        ref = model(tokens).logits
    c = tying.apply_(model, bottleneck(tie_a=["layer"], train_v=False))
    assert c.trainable == 4 * 32 + 3 * 32 * 4 and c.frozen == 3 * 32  # A tied (r x d_out), B per layer, v frozen
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    snap = snapshot(model)
    with pytest.raises(NotMergeableError, match="non-linear"):
        tying.merge_(model)
    assert same_state(model, snap)
    tying.save_adapter(model, tmp_path)
    other = tiny_llama()
    tying.load_adapter(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, model(tokens).logits)
    tying.unapply_(model)
    assert not hasattr(model, "tying_bank")


def test_kind_errors():
    bad = ia3()
    bad["adapter"]["factors"]["A"] = {"init": "zeros"}
    with pytest.raises(tying.errors.SpecError, match=r"a ia3 adapter needs factors \['v'\].*not allowed \['A'\]"):
        tying.load_spec(bad)
    conv = torch.nn.Module()
    conv.c = torch.nn.Conv2d(1, 4, 3)
    spec = {"targets": [{"select": "c"}], "adapter": {"kind": "bottleneck", "rank": 2, "factors": {
        "A": {"init": "zeros"}, "B": {"init": "zeros"}}}}
    with pytest.raises(tying.errors.UnsupportedModuleError, match="bottleneck adapters support modules with last-axis"):
        tying.apply_(conv, spec)
