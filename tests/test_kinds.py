"""Adapter kinds beyond LoRA: IA3 (output and input scaling), bottleneck adapters and prefix tuning,
with ties, on tiny Llama / GPT-2 models and custom modules."""

import pytest
import torch
from conftest import same_state, snapshot, tiny_gpt2, tiny_llama

import tying
from tying.errors import NotMergeableError

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


def refuses_merge_and_round_trips(model, match, tmp_path, tokens):
    """merge_ raises NotMergeableError and changes nothing; the saved adapter loads into a fresh model
    with identical outputs."""
    snap = snapshot(model)
    with pytest.raises(NotMergeableError, match=match):
        tying.merge_(model)
    assert same_state(model, snap)
    tying.save_adapter(model, tmp_path)
    other = tiny_llama()
    tying.load_adapter(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, model(tokens).logits)


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
    refuses_merge_and_round_trips(model, "non-linear", tmp_path, tokens)
    tying.unapply_(model)
    assert not hasattr(model, "tying_bank")


def test_kind_errors():
    bad = ia3()
    bad["adapter"]["factors"]["A"] = {"init": "zeros"}
    with pytest.raises(tying.errors.SpecError, match=r"a ia3 adapter needs factors \['u or v'\] and allows \['u', 'v'\].*"
                                                     r"not allowed \['A'\]"):
        tying.load_spec(bad)
    bad["adapter"]["factors"] = {}
    with pytest.raises(tying.errors.SpecError, match=r"missing \['u or v'\]"):
        tying.load_spec(bad)
    conv = torch.nn.Module()
    conv.c = torch.nn.Conv2d(1, 4, 3)
    spec = {"targets": [{"select": "c"}], "adapter": {"kind": "bottleneck", "rank": 2, "factors": {
        "A": {"init": "zeros"}, "B": {"init": "zeros"}}}}
    with pytest.raises(tying.errors.UnsupportedModuleError, match="bottleneck adapters need modules with outputs with their features on the last axis"):
        tying.apply_(conv, spec)


# ---------------------------------------------------------------- IA3 on the input
def ia3_in_out():
    """IA3 as its paper places it: keys/values scaled at the output, the feed-forward down projection at its input."""
    return {"targets": [{"select": ATTN}, {"select": MLP}],
            "adapter": {"kind": "ia3", "rank": 1, "factors": {"v": {"init": "ones"}, "u": {"init": "ones"}}}}


def test_ia3_input_scaling_counts_merge_and_unmerge(tokens):
    model = tiny_llama()  # k/v: d_in 32, d_out 16; down_proj: d_in 64, d_out 32
    c = tying.count(model, ia3_in_out())
    assert c.trainable == 3 * ((32 + 16) * 2 + (64 + 32)) and c.by_factor["u"]["trainable"] == 3 * (32 + 32 + 64)
    with torch.no_grad():
        ref = model(tokens).logits
    snap = snapshot(model)
    tying.apply_(model, ia3_in_out())
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref)
        for p in model.tying_bank.parameters():
            p.uniform_(0.5, 1.5)
        scaled = model(tokens).logits
        assert (scaled - ref).abs().max() > 1e-3
        # the input scale acts on the input: down_proj(x * u) by hand
        w = model.model.layers[0].mlp.down_proj
        x = torch.randn(5, 64)
        assert torch.allclose(w(x), w.base(x * w.factor("u")) * w.factor("v"), atol=1e-6)
        tying.merge_(model)
        assert (model(tokens).logits - scaled).abs().max() < 1e-5
        tying.unmerge_(model)
        assert (model(tokens).logits - scaled).abs().max() < 1e-5
    tying.unapply_(model)
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in snap.items())


def test_ia3_input_on_gpt2_conv1d_merges(tokens):
    model = tiny_gpt2()
    spec = {"targets": [{"select": "transformer.h.{layer:#}.mlp.c_proj"}],
            "adapter": {"kind": "ia3", "rank": 1, "factors": {"u": {"tie": ["layer"], "init": {"kind": "normal", "mean": 1.0, "std": 0.3, "seed": 3}}}}}
    assert tying.count(model, spec).trainable == 4 * 32  # one u of d_in = 4 * n_embd, shared by the layers
    tying.apply_(model, spec)
    with torch.no_grad():
        scaled = model(tokens).logits
        tying.merge_(model)
        assert (model(tokens).logits - scaled).abs().max() < 1e-5


def test_ia3_input_refused_on_embedding():
    model = tiny_llama()
    snap = snapshot(model)
    spec = {"targets": [{"select": "model.embed_tokens"}],
            "adapter": {"kind": "ia3", "rank": 1, "factors": {"u": {"init": "ones"}}}}
    with pytest.raises(tying.errors.UnsupportedModuleError, match="ia3 adapters with factor u need modules with features on the last axis"):
        tying.apply_(model, spec)
    assert same_state(model, snap)


# ---------------------------------------------------------------- prefix tuning
def prefix(r=3, tie=None, std=1.0):
    f = {"tie": tie or [], "init": {"kind": "normal", "std": std, "seed": 0}}
    return {"targets": [{"select": "model.layers.{layer:#}.self_attn"}],
            "adapter": {"kind": "prefix", "rank": r, "factors": {"pk": f, "pv": {**f, "init": {**f["init"], "seed": 1}}}}}


def test_prefix_counts_tied_and_untied():
    model = tiny_llama()  # GQA: 2 kv heads x head_dim 8 = 16
    assert tying.count(model, prefix(r=3)).trainable == 3 * 2 * 3 * 16
    c = tying.count(model, prefix(r=3, tie="all"))
    assert c.trainable == 2 * 3 * 16 and c.by_factor["pk"]["groups"] == 1


def test_prefix_equals_a_prefilled_kv_cache(tokens):
    """The prefix acts exactly like r cached key/value entries that every token sees, at unshifted positions."""
    import transformers
    from transformers import DynamicCache

    model = tiny_llama()
    tying.apply_(model, prefix(r=3))
    with torch.no_grad():
        out = model(tokens).logits
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            heads = lambda p: p.view(3, 2, 8).transpose(0, 1).expand(tokens.shape[0], -1, -1, -1)
            cache.update(heads(attn.factor("pk")), heads(attn.factor("pv")), i)
        tying.unapply_(model)
        plain = model(tokens).logits
        kw = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"  # renamed in v5
        ref = model(tokens, **{kw: cache}, attention_mask=torch.ones(2, 3 + 7, dtype=torch.long),
                    position_ids=torch.arange(7).expand(2, -1)).logits
    assert torch.allclose(out, ref, atol=1e-5) and (out - plain).abs().max() > 1e-2


def test_prefix_respects_padding_and_generates(tokens):
    model = tiny_gpt2()
    spec = {"targets": [{"select": "transformer.h.{layer:#}.attn"}],
            "adapter": {"kind": "prefix", "rank": 2, "factors": {"pk": {"tie": "all", "init": "normal"},
                                                                 "pv": {"tie": "all", "init": "normal"}}}}
    tying.apply_(model, spec)
    padded = torch.cat([tokens[:1], torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask).logits[:, :7], model(tokens[:1]).logits, atol=1e-5)
        # greedy decoding with the prefix: each new token is the argmax of the adapted model's last logits
        gen = model.generate(tokens[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)  # with the KV cache
        seq = tokens[:1]
        for _ in range(3):  # greedy decoding by full forward passes, no cache
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(gen, seq)
        base = tiny_gpt2()
        assert not torch.equal(model(tokens[:1]).logits, base(tokens[:1]).logits)  # the prefix is in play


def test_prefix_trains_only_its_factors_saves_and_refuses_merge(tmp_path, tokens):
    model = tiny_llama()
    tying.apply_(model, prefix(r=2, tie="all", std=0.1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == \
        ["tying_bank.pk.*", "tying_bank.pv.*"]
    refuses_merge_and_round_trips(model, "prefix tuning .* no merged form", tmp_path, tokens)


def test_prefix_errors():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    snap = snapshot(model)
    with pytest.raises(tying.errors.UnsupportedModuleError, match="prefix adapters need the 'sdpa' attention"):
        tying.apply_(model, prefix())
    assert same_state(model, snap) and not hasattr(model, "tying_bank")
    lora_on_attention = {"targets": [{"select": "model.layers.{layer:#}.self_attn"}],
                         "adapter": {"rank": 2, "factors": {"A": {"init": "zeros"}, "B": {"init": "zeros"}}}}
    with pytest.raises(tying.errors.UnsupportedModuleError, match="is a Attention: lora adapters need modules with down and up products"):
        tying.apply_(tiny_llama(), lora_on_attention)
    on_linear = prefix()
    on_linear["targets"] = [{"select": "model.layers.{layer:#}.self_attn.q_proj"}]
    with pytest.raises(tying.errors.UnsupportedModuleError, match="prefix adapters need modules with attention entries"):
        tying.apply_(tiny_llama(), on_linear)
