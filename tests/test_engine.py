"""The engine on tiny random Llama and GPT-2 models: every preset, merge, unapply, gradients, state."""

import copy
import io

import pytest
import torch
from conftest import randomize_bank, same_state, snapshot, tiny_llama

import tying
from tying.errors import NotMergeableError
from tying.presets.families import FAMILIES

PRESETS = [p for p in tying.preset_names() if p not in FAMILIES]
KIND = {p: tying.load_spec(p).adapter.kind for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_equals_unmerged(tiny, tokens, preset):
    tying.apply_(tiny, tying.load_spec(preset, rank=4))
    randomize_bank(tiny)
    if KIND[preset] in ("bottleneck", "prefix"):  # no merged form: refused before any weight changes
        snap = snapshot(tiny)
        with pytest.raises(NotMergeableError, match="no merged form"):
            tying.merge_(tiny)
        assert same_state(tiny, snap)
        return
    with torch.no_grad():
        unmerged = tiny(tokens).logits
        tying.merge_(tiny)
        merged = tiny(tokens).logits
        tying.unmerge_(tiny)
        again = tiny(tokens).logits
    assert (merged - unmerged).abs().max() < 1e-5
    assert (again - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_unapply_restores_exactly(tiny, tokens, preset):
    snap = snapshot(tiny)
    grads = {n: p.requires_grad for n, p in tiny.named_parameters()}
    tying.apply_(tiny, tying.load_spec(preset, rank=4))
    randomize_bank(tiny)
    tiny(tokens).logits.sum().backward()
    tying.unapply_(tiny)
    assert same_state(tiny, snap)
    assert {n: p.requires_grad for n, p in tiny.named_parameters()} == grads
    assert not hasattr(tiny, "tying_bank")


@pytest.mark.parametrize("preset", PRESETS)
def test_exactly_trained_factors_get_gradients(tiny, tokens, preset):
    spec = tying.load_spec(preset, rank=4)
    tying.apply_(tiny, spec)
    randomize_bank(tiny)  # so that no gradient is zero by construction
    tiny(tokens).logits.square().mean().backward()
    for factor, params in tiny.tying_bank.items():
        train = spec.adapter.factors[factor].train
        for key, p in params.items():
            assert p.requires_grad == train
            assert (p.grad is not None and p.grad.abs().sum() > 0) == train, (factor, key)
    base = [n for n, p in tiny.named_parameters() if not n.startswith("tying_bank") and p.grad is not None]
    assert base == []


def test_start_is_zero_update(tiny, tokens):
    with torch.no_grad():
        ref = tiny(tokens).logits
    for preset in (p for p in PRESETS if KIND[p] != "prefix"):  # a prefix takes attention mass from the start
        tying.apply_(tiny, tying.load_spec(preset, rank=4))
        with torch.no_grad():
            assert torch.equal(tiny(tokens).logits, ref), preset
        tying.unapply_(tiny)


def test_unapply_with_merge_keeps_the_update(tiny, tokens):
    tying.apply_(tiny, "tl6")
    randomize_bank(tiny)
    with torch.no_grad():
        adapted = tiny(tokens).logits
        tying.unapply_(tiny, merge=True)
        assert (tiny(tokens).logits - adapted).abs().max() < 1e-5


def test_state_dict_holds_each_factor_once(tiny):
    tying.apply_(tiny, "tl6")
    sd = tiny.state_dict()
    record = {"tying_bank.merged", "tying_bank.merged_task"}  # the merge record, always present
    assert record <= sd.keys() and not sd["tying_bank.merged"].any() and not sd["tying_bank.merged_task"].numel()
    bank_keys = [k for k in sd if k.startswith("tying_bank.") and k not in record]
    plan_groups = tying.bank_of(tiny).state_dict()
    assert len(bank_keys) == len(plan_groups)
    assert len({k.split(".")[1] for k in bank_keys}) == 4  # A, B, u, v
    assert len([k for k in bank_keys if k.startswith("tying_bank.A.")]) == 1  # one A for all layers
    ptrs = {}
    for k, v in sd.items():
        if k.startswith("tying_bank.") or v.numel():
            ptrs.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    shared = [ks for ks in ptrs.values() if len(ks) > 1 and any(k.startswith("tying_bank.") for k in ks)]
    assert shared == []
    assert not any(".A." in k or ".B." in k for k in sd if not k.startswith("tying_bank."))


def test_optimizer_steps_a_tied_factor_once():
    model = tiny_llama(layers=4)
    tying.apply_(model, "tl6")
    randomize_bank(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len({id(p) for p in trainable}) == len(list(model.tying_bank.parameters()))
    A = next(iter(model.tying_bank["A"].values()))
    before = A.detach().clone()
    opt = torch.optim.Adam(trainable, lr=1e-3)
    model(torch.randint(0, 100, (2, 5))).logits.square().mean().backward()
    opt.step()
    # Adam's first step moves each element by at most lr; stepped once per layer it would move 4x.
    step = (A.detach() - before).abs().max().item()
    assert 0.9e-3 < step < 1.01e-3


def test_save_load_round_trip_is_bit_exact(tiny, tokens, tmp_path):
    tying.apply_(tiny, tying.load_spec("tl6", rank=4))
    randomize_bank(tiny)
    with torch.no_grad():
        ref = tiny(tokens).logits
    tying.save_adapter(tiny, tmp_path / "ad")
    saved = tying.bank_of(tiny).state_dict()
    tying.unapply_(tiny)
    tying.load_adapter(tiny, tmp_path / "ad")
    loaded = tying.bank_of(tiny).state_dict()
    assert list(saved) == list(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(tiny(tokens).logits, ref)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "spec.yaml"]


def test_load_into_already_adapted_model(tiny, tmp_path):
    tying.apply_(tiny, "tl6")
    randomize_bank(tiny)
    tying.save_adapter(tiny, tmp_path)
    saved = {k: v.clone() for k, v in tying.bank_of(tiny).state_dict().items()}
    tying.bank_of(tiny).reset_parameters()
    tying.load_adapter(tiny, tmp_path)
    assert all(torch.equal(v, saved[k]) for k, v in tying.bank_of(tiny).state_dict().items())


def test_deepcopy_keeps_ties_and_is_independent(tokens):
    model = tiny_llama()
    tying.apply_(model, "tl6")
    randomize_bank(model)
    snap = snapshot(model)
    clone = copy.deepcopy(model)
    wrappers = [m for _, m in tying.engine.wrappers(clone)]
    assert all(w.bank is clone.tying_bank for w in wrappers)
    opt = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.1)
    clone(tokens).logits.square().mean().backward()
    opt.step()
    assert same_state(model, snap)
    assert not torch.equal(clone.state_dict()["tying_bank.A.model:layers:*:self_attn:*"],
                           snap["tying_bank.A.model:layers:*:self_attn:*"])


def test_torch_save_whole_model(tokens):
    model = tiny_llama()
    tying.apply_(model, "tl6")
    randomize_bank(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert all(w.bank is loaded.tying_bank for _, w in tying.engine.wrappers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_meta_device_and_to_empty(tokens):
    with torch.device("meta"):
        model = tiny_llama()
    tying.apply_(model, "tl6")
    assert all(p.device.type == "meta" for p in model.tying_bank.parameters())
    model.to_empty(device="cpu")
    assert all(w.bank is model.tying_bank for _, w in tying.engine.wrappers(model))
    tying.bank_of(model).reset_parameters()
    u = next(iter(model.tying_bank["u"].values()))
    assert torch.equal(u, torch.ones_like(u))
    q = model.model.layers[0].self_attn.q_proj  # a wrapper whose base is materialised by hand
    q.base.reset_parameters()
    x = torch.randn(3, 32)
    assert torch.equal(q(x), q.base(x))  # zero update at the start (v = 0), and finite
    assert torch.isfinite(q(x)).all()


def test_device_and_dtype_arguments(tiny):
    tying.apply_(tiny, "tl6", dtype=torch.float64, device="cpu")
    assert {p.dtype for p in tiny.tying_bank.parameters()} == {torch.float64}
    out = tiny(torch.randint(0, 100, (1, 4))).logits
    assert out.dtype == torch.float32
    with torch.device("meta"):  # a base on another device than the one asked for: the factors go where asked
        meta = type(tiny)(tiny.config)
    tying.apply_(meta, "tl6", device="cpu")
    assert {p.device.type for p in meta.tying_bank.parameters()} == {"cpu"}
    assert {p.device.type for n, p in meta.named_parameters() if "tying_bank" not in n} == {"meta"}


def test_seeded_init_is_reproducible():
    a, b = tiny_llama(), tiny_llama(seed=5)
    torch.manual_seed(1)
    tying.apply_(a, "tl6")
    torch.manual_seed(2)
    tying.apply_(b, "tl6")
    sa, sb = tying.bank_of(a).state_dict(), tying.bank_of(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plan_summary_and_plan_object(tiny):
    p = tying.plan(tiny, tying.load_spec("tl6", rank=4))
    text = p.summary()
    assert "trainable" in text and len(p.sites) == (9 if "llama" in type(tiny).__name__.lower() else 3)
    assert not hasattr(tiny, "tying_bank")
    # by hand, rank 4: A (4 x 32) tied; B tied across layers per projection; u (4) per layer; v (d_out) per site
    if "llama" in type(tiny).__name__.lower():  # q 32 out, k/v 16 out (GQA)
        want = {"A": 4 * 32, "B": (32 + 16 + 16) * 4, "u": 3 * 4, "v": 3 * (32 + 16 + 16)}
    else:  # fused c_attn, 96 out
        want = {"A": 4 * 32, "B": 96 * 4, "u": 3 * 4, "v": 3 * 96}
    assert {f: c["trainable"] for f, c in p.counts.by_factor.items()} == want
    counts = tying.apply_(tiny, p)
    assert counts.trainable == sum(want.values()) == sum(q.numel() for q in tiny.tying_bank.parameters())
    assert f"{counts.trainable:,}" in text
