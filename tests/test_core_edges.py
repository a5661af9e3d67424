"""Core edge cases on plain torch models (no extra needed): half-precision bases end to end, dropout,
freeze_base: false, IA3's unmerge refusal, convolutions with stride / dilation / 'same' padding and the
groups refusal, an Embedding with padding_idx, and what merge / unmerge / unapply give back exactly."""

import pytest
import torch
from torch import nn

import tying
from tying.errors import NotMergeableError


class Tower(nn.Module):
    def __init__(self, width=16, layers=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


TARGET = [{"select": "layers.{layer:#}"}]


def tl6(rank=4, **adapter):
    """TL6 on the tower: A and B tied across layers, u and v per layer."""
    return tying.load_spec({"targets": TARGET, "adapter": {"rank": rank, **adapter, "factors": {
        "A": {"tie": ["layer"], "init": {"kind": "normal", "seed": 0}},
        "B": {"tie": ["layer"], "init": {"kind": "normal", "seed": 1}},
        "u": {"init": "ones"}, "v": {"init": "zeros"}}}})


def randomize(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tying.bank_of(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_trains_saves_and_loads_into_float32(tmp_path, dtype):
    model = Tower().to(dtype)
    tying.apply_(model, tl6(), dtype=torch.float32)  # master factors in float32 on a half base
    bank = tying.bank_of(model)
    assert {p.dtype for p in bank.parameters()} == {torch.float32}
    assert all(p.dtype == dtype for n, p in model.named_parameters() if not n.startswith("tying_bank"))
    x = torch.randn(8, 16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    loss = model(x.to(dtype)).float().square().mean()
    loss.backward()
    opt.step()
    moved = [k for k, v in bank.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all(p.grad is None for n, p in model.named_parameters() if not n.startswith("tying_bank"))
    tying.save_adapter(model, tmp_path)
    full = Tower()  # the same base in float32
    tying.load_adapter(full, tmp_path)
    assert all(torch.equal(v, bank.state_dict()[k]) for k, v in tying.bank_of(full).state_dict().items())
    with torch.no_grad():
        half, single = model(x.to(dtype)).float(), full(x)
    assert (half - single).abs().max() < 0.05 and (single - Tower()(x)).abs().max() > 1e-3


def test_dropout_acts_on_the_adapter_input_in_training_only():
    plain, dropped = Tower(), Tower()
    tying.apply_(plain, tl6())
    tying.apply_(dropped, tl6(dropout=0.5))
    randomize(plain)
    randomize(dropped)
    x = torch.randn(64, 16)
    with torch.no_grad():
        dropped.eval()
        plain.eval()
        assert torch.equal(dropped(x), plain(x))  # eval: no dropout
        dropped.train()
        torch.manual_seed(0)
        a = dropped(x)
        torch.manual_seed(1)
        b = dropped(x)
    assert not torch.equal(a, b) and not torch.equal(a, plain(x))
    base = Tower()
    with torch.no_grad():  # dropout never touches the base path: zero factors give the base exactly
        for p in tying.bank_of(dropped).parameters():
            p.zero_()
        assert torch.equal(dropped(x), base(x))


def test_freeze_base_false_trains_base_and_factors_and_unapply_restores_flags():
    model = Tower()
    model.layers[2].bias.requires_grad_(False)  # the user's own choice survives apply_/unapply_
    counts = tying.apply_(model, tl6().model_copy(update={"freeze_base": False}))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads["layers.0.base.weight"] and grads["layers.2.base.weight"] and not grads["layers.2.base.bias"]
    assert counts.trainable == sum(p.numel() for p in tying.bank_of(model).parameters() if p.requires_grad)
    model(torch.randn(4, 16)).sum().backward()
    assert model.layers[0].base.weight.grad is not None
    tying.unapply_(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: n != "layers.2.bias" for n, _ in Tower().named_parameters()}


def test_ia3_unmerge_refused_when_a_vector_holds_zero():
    model = Tower()
    tying.apply_(model, {"targets": TARGET, "adapter": {"kind": "ia3", "rank": 1, "factors": {"v": {"init": "ones"}}}})
    randomize(model)
    with torch.no_grad():
        tying.bank_of(model).parameters().__next__()[0] = 0.0
    tying.merge_(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match="cannot unmerge an IA3 vector with zeros"):
        tying.unmerge_(model)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())


class Holder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


def lora(selects, rank=2):
    return {"targets": [{"select": x} for x in selects],
            "adapter": {"rank": rank, "factors": {"A": {"init": "kaiming_uniform"}, "B": {"init": "zeros"}}}}


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.strided = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=2)
        self.same = nn.Conv2d(6, 6, 3, padding="same", dilation=2)
        self.seq = nn.Conv1d(6, 4, 5, stride=3, padding=2)

    def forward(self, x):
        h = self.same(self.strided(x))
        return self.seq(h.flatten(2))


def test_convolutions_with_stride_dilation_and_same_padding_merge_exactly():
    model = Convs()
    x = torch.randn(2, 3, 12, 12)
    tying.apply_(model, lora(["re:strided|same|seq"]))
    randomize(model)
    with torch.no_grad():
        unmerged = model(x)
        tying.merge_(model)
        merged = model(x)
    assert unmerged.shape == Convs()(x).shape and (unmerged - Convs()(x)).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_grouped_convolution_is_refused():
    model = Holder(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(tying.errors.UnsupportedModuleError, match=r"'m' \(Conv2d\) has groups=2"):
        tying.apply_(model, lora(["m"]))
    assert not hasattr(model, "tying_bank")


def test_embedding_with_padding_idx():
    emb = Holder(nn.Embedding(10, 6, padding_idx=0))
    tying.apply_(emb, lora(["m"]))
    randomize(emb)
    ids = torch.tensor([[0, 3, 0, 5]])
    emb(ids).sum().backward()
    A = tying.bank_of(emb).A[next(iter(tying.bank_of(emb).A.keys()))]
    assert A.grad[:, 0].abs().sum() == 0 and A.grad[:, 3].abs().sum() > 0  # like the base's padding row
    with torch.no_grad():
        unmerged = emb(ids)
        tying.merge_(emb)
        torch.testing.assert_close(emb(ids), unmerged, rtol=1e-6, atol=1e-6)


def test_what_unapply_and_unmerge_give_back():
    """unapply_ without a merge restores the original weights bit for bit (they were never written);
    merge_ then unmerge_ restores them up to float rounding of W + delta - delta."""
    model, ref = Tower(), Tower()
    tying.apply_(model, tl6())
    randomize(model)
    tying.merge_(model)
    tying.unmerge_(model)
    w, w0 = model.layers[0].weight, ref.layers[0].weight
    assert (w - w0).abs().max() < 1e-6
    tying.unapply_(model)
    fresh = Tower()
    tying.apply_(fresh, tl6())
    randomize(fresh)
    tying.unapply_(fresh)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in fresh.state_dict().items())
