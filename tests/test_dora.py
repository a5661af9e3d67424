"""DoRA as a registered kind (tying/kinds/dora.py): exact merge, the paper's update, PEFT's DoRA on export."""

import json

import pytest
import torch
from conftest import lm_steps, randomize_bank, tiny_gpt2, tiny_llama

import tying

FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _randomized(model, preset, rank=4, **overrides):
    tying.apply_(model, tying.load_spec(preset, rank=rank, **overrides))
    randomize_bank(model)
    with torch.no_grad():  # magnitudes near one, as after training, so that the direction term matters too
        for m in model.tying_bank["m"].values():
            m.add_(1.0)
    return model


@pytest.mark.parametrize("preset", ["dora", "tied-dora"])
def test_contract_merged_equals_unmerged(preset, tokens):
    model = tiny_llama()
    plain = model(input_ids=tokens).logits
    counts = tying.apply_(model, tying.load_spec(preset, rank=4))
    assert "m" in counts.by_factor
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, plain)  # m = 1 and a zero update: the base exactly
    randomize_bank(model)
    with torch.no_grad():
        unmerged = model(input_ids=tokens).logits
        tying.merge_(model)
        merged = model(input_ids=tokens).logits
        tying.unmerge_(model)
        again = model(input_ids=tokens).logits
    assert (unmerged - plain).abs().max() > 1e-3
    assert torch.allclose(merged, unmerged, atol=1e-5) and torch.allclose(again, unmerged, atol=1e-5)


def test_the_update_is_the_papers():
    """One Linear: y = m ||W|| / ||W + dW|| * (W + dW) x + b, row by row, with dW = scale diag(v) B diag(u) A."""
    net = torch.nn.Module()
    net.lin = torch.nn.Linear(6, 5)
    spec = {"targets": [{"select": "lin"}], "adapter": {"kind": "dora", "rank": 2, "alpha": 4, "factors": {
        "A": {"init": {"kind": "normal", "seed": 0}}, "B": {"init": {"kind": "normal", "seed": 1}},
        "u": {"init": {"kind": "normal", "seed": 2}}, "v": {"init": {"kind": "normal", "seed": 3}},
        "m": {"init": {"kind": "uniform", "seed": 4}}}}}
    W, b = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    tying.apply_(net, spec)
    f = {n: net.lin.factor(n).detach() for n in "ABuvm"}
    dW = 2.0 * (f["v"][:, None] * f["B"]) @ (f["u"][:, None] * f["A"])
    V = W + dW
    expected_weight = (f["m"] * W.norm(dim=1) / V.norm(dim=1))[:, None] * V
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(net.lin(x), x @ expected_weight.T + b, atol=1e-5)


def test_norm_is_a_constant_in_the_backward():
    """As in the paper and PEFT: dL/dm is the gradient through m alone, the norm ||W + dW|| carries none."""
    net = torch.nn.Module()
    net.lin = torch.nn.Linear(4, 3, bias=False)
    spec = {"targets": [{"select": "lin"}], "adapter": {"kind": "dora", "rank": 2, "factors": {
        "A": {"init": {"kind": "normal", "seed": 0}}, "B": {"init": {"kind": "normal", "seed": 1}},
        "m": {"init": "ones"}}}}
    tying.apply_(net, spec)
    x = torch.randn(5, 4)
    net.lin(x).sum().backward()
    W = net.lin.base.weight.detach()
    A, B = net.lin.factor("A").detach(), net.lin.factor("B").detach()
    V = W + B @ A
    expected = (W.norm(dim=1) / V.norm(dim=1)) * (x @ V.T).sum(0)
    assert torch.allclose(net.lin.factor("m").grad, expected, atol=1e-5)


@pytest.mark.parametrize("preset", ["dora", "tied-dora"])
@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_export_equals_peft_dora(tmp_path, fam, preset, tokens):
    peft = pytest.importorskip("peft")
    from tying.integrations.peft import export_peft

    model = _randomized(FAMILIES[fam](), preset, alpha=8)  # scale 2 absorbed too
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == 8  # padded to one vLLM serves
    served = peft.PeftModel.from_pretrained(FAMILIES[fam](), tmp_path).eval()
    with torch.no_grad():
        out = served(input_ids=tokens).logits
    assert (out - ref).abs().max() < 1e-4


def test_export_from_a_meta_model_is_refused(tmp_path):
    pytest.importorskip("peft")
    from tying.integrations.peft import export_peft

    model = _randomized(tiny_llama(), "dora")
    tying.save_adapter(model, tmp_path / "a")
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(tying.errors.AdapterFileError, match="meta device has no weight"):
        export_peft(meta, tmp_path / "out", adapter=tmp_path / "a")
    assert not (tmp_path / "out").exists()
    tying.merge_(model)  # a merged weight holds the update: its norms are not the base's
    with pytest.raises(tying.errors.AdapterFileError, match="is merged.*unmerge_"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zero_rows_stay_finite_and_a_zero_magnitude_does_not_unmerge(tokens):
    net = torch.nn.Module()
    net.lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        net.lin.weight[1] = 0.0  # a dead output row: ||W|| = ||W + dW|| = 0 at the start
    spec = {"targets": [{"select": "lin"}], "adapter": {"kind": "dora", "rank": 2, "factors": {
        "A": {"init": {"kind": "normal", "seed": 0}}, "B": {"init": "zeros"}, "m": {"init": "ones"}}}}
    x = torch.randn(5, 4)
    ref = net.lin(x)
    tying.apply_(net, spec)
    with torch.no_grad():
        assert torch.equal(net.lin(x), ref)  # finite, the base exactly
        net.lin.factor("m")[0] = 0.0
        tying.merge_(net)
    with pytest.raises(tying.errors.NotMergeableError, match="magnitude has zeros"):
        tying.unmerge_(net)


def test_not_mixable_and_not_on_convolutions(tmp_path):
    model = _randomized(tiny_llama(), "tied-dora")
    tying.save_adapter(model, tmp_path / "a")
    with pytest.raises(tying.errors.ServingError, match="dora adapter, which cannot be mixed row by row"):
        tying.load_adapters_(tiny_llama(), {"a": tmp_path / "a"})
    net = torch.nn.Module()
    net.conv = torch.nn.Conv2d(2, 4, 3)
    spec = {"targets": [{"select": "conv"}], "adapter": {"kind": "dora", "rank": 2, "factors": {
        "A": {"init": "zeros"}, "B": {"init": "zeros"}, "m": {"init": "ones"}}}}
    with pytest.raises(tying.errors.UnsupportedModuleError, match="is a Conv2d: dora adapters need modules with "
                                                                  "features on the last axis"):
        tying.apply_(net, spec)


def test_trains_and_round_trips_through_an_adapter_folder(tmp_path, tokens):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tied-dora", rank=4))
    losses = lm_steps(model, tokens, 5, 1e-2)
    assert losses[-1] < losses[0]
    tying.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    tying.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)
