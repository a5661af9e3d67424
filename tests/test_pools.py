"""Soft tying (issue 37): factors drawn from pools by trained weights, top-k logits or a router; the family presets
(Lily, VB-LoRA, MoS, HydraLoRA, MTL-LoRA) with PEFT's counts; PEFT's Lily, VB-LoRA and VeRA folders imported with
PEFT's outputs; static mixes merge, export and serve; routed mixes refuse with a reason."""

import json

import pytest
import torch
from conftest import randomize_bank, same_state, snapshot, tiny_llama
from torch import nn

import tying
from tying import pools
from tying.errors import NotMergeableError, ServingError, SpecError

KNOBS = {"lily": {"rank": 4, "stride_a": 2, "num_b": 3}, "vb-lora": {"rank": 4, "num_vectors": 32, "vector_length": 16},
         "mos": {"rank": 4, "shards": 16}, "hydralora": {"rank": 4, "heads": 3},
         "mtl-lora": {"rank": 4, "heads": 2, "tasks": ["a", "b"]}}
ROUTED = {"lily", "hydralora"}


class Stack(nn.Module):
    """torch-only (the core suite runs these without transformers)."""

    def __init__(self, layers=4, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for m in self.l:
            x = torch.tanh(m(x))
        return x


def pooled(mix="topk", entry=4, k=2, router="down", reduce="token", train_logits=True):
    pool = {"size": 6, "entry": entry, "init": {"kind": "normal", "std": 0.3, "seed": 0}}
    factor = {"pool": "P", "mix": mix, "train": train_logits, "init": {"kind": "normal", "seed": 1}}
    if mix == "topk":
        factor["k"] = k
    if mix == "router":
        factor.update(router=router, reduce=reduce, init={"kind": "kaiming_uniform", "seed": 1})
        pool["entry"] = None
    factors = {"A": {"init": {"kind": "kaiming_uniform", "seed": 2}}, "B": factor}
    if mix != "router":
        factors["A"] = {**factor}
    return {"targets": [{"select": "l.{layer:#}"}], "adapter": {"rank": 4, "pools": {"P": pool}, "factors": factors}}


@pytest.mark.parametrize("bad, words", [
    ({"pool": "Q", "mix": "topk", "k": 1}, "pool names 'Q'"),
    ({"pool": "P"}, "names both: pool"),
    ({"pool": "P", "mix": "weights", "k": 2}, "k .* goes with mix: topk"),
    ({"pool": "P", "mix": "topk", "k": 9}, "larger than pool 'P'"),
])
def test_bad_pooled_factors_are_clear_errors(bad, words):
    spec = pooled()
    spec["adapter"]["factors"]["B"] = {**bad, "init": "zeros"}
    with pytest.raises(SpecError, match=words):
        tying.load_spec(spec)


def test_routers_need_whole_entries_and_vectors_must_divide_the_widths():
    spec = pooled("router")
    spec["adapter"]["pools"]["P"]["entry"] = 4
    with pytest.raises(SpecError, match="mixes by router only .*from whole entries"):
        tying.load_spec(spec)
    spec = pooled("router")
    spec["adapter"]["factors"]["A"] = {"pool": "P", "mix": "router", "init": "zeros"}
    with pytest.raises(SpecError, match=r"mixes by router only \['B'\]"):
        tying.load_spec(spec)
    with pytest.raises(SpecError, match="cannot be cut into vectors of length 5"):
        tying.plan(Stack(), tying.load_spec(pooled(entry=5)))
    spec = pooled("weights", entry=None)
    spec["adapter"]["factors"]["B"]["init"] = "kaiming_uniform"
    with pytest.raises(SpecError, match="mixing weights are a vector"):
        tying.plan(Stack(), tying.load_spec(spec))


def test_a_pool_is_one_tensor_for_every_site_that_draws_from_it(tmp_path):
    m = Stack()
    counts = tying.apply_(m, pooled())
    bank = tying.bank_of(m)
    assert list(bank["P"]) == ["*"] and bank["P"]["*"].shape == (6, 4)  # one bank of vectors for A and B, 4 layers
    assert counts.trainable == 6 * 4 + 4 * 2 * (4 * 4 * 6)  # the pool, and per site A's and B's logits (4 tiles)
    tying.save_adapter(m, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert [k for k in f.keys() if k.startswith("P.")] == ["P.*"]  # noqa: SIM118
    fresh = Stack(seed=0)
    tying.load_adapter(fresh, tmp_path)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_draw_assembles_vb_lora_s_matrices():
    """The tiled top-k mix, against VB-LoRA's own formula (PEFT's _get_low_rank_matrix, written out)."""
    g = torch.Generator().manual_seed(0)
    bank, la, lb = torch.randn(8, 4, generator=g), torch.randn(3, 5, 8, generator=g), torch.randn(5, 3, 8, generator=g)

    def ref(logits):
        top, idx = logits.topk(2, dim=-1)
        return (torch.softmax(top, -1).unsqueeze(-1) * bank[idx]).sum(-2)
    A = pools.draw(bank, la, "topk", 2, ("rank", "d_in"), True)
    B = pools.draw(bank, lb, "topk", 2, ("d_out", "rank"), True)
    assert torch.equal(A, ref(la).reshape(3, -1))
    assert torch.equal(B, ref(lb).transpose(1, 2).reshape(-1, 3))
    one = pools.draw(bank, la, "topk", 1, ("rank", "d_in"), True)  # top-1: a selection by index, exactly
    assert torch.equal(one.reshape(3, 5, 4), bank[la.argmax(-1)])


@pytest.mark.parametrize("reduce", ["token", "batch"])
@pytest.mark.parametrize("router", ["input", "down"])
def test_a_routed_mix_computes_the_formula_and_refuses_merge_and_export(tmp_path, router, reduce):
    m = Stack(layers=1)
    tying.apply_(m, pooled("router", router=router, reduce=reduce))
    randomize_bank(m)
    w = m.l[0]
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        A, R, P = (tying.bank_of(m)[f][k] for f, k in (("A", "l:0"), ("B", "l:0"), ("P", "*")))
        h = x.reshape(-1, 16) @ A.T  # (tokens, r)
        p = torch.softmax((x.reshape(-1, 16) if router == "input" else h) @ R.T, -1)  # (tokens, 6)
        if reduce == "batch":
            p = p.mean(0, keepdim=True).expand_as(p)
        delta = torch.einsum("tk,kor,tr->to", p, P, h).reshape(2, 3, 16)
        assert torch.allclose(w(x), w.base(x) + delta, atol=1e-6)
    before = snapshot(m)
    with pytest.raises(NotMergeableError, match="depends on the input"):
        tying.merge_(m)
    assert same_state(m, before)
    tying.save_adapter(m, tmp_path / "ad")
    from tying.integrations.peft import export_peft
    with pytest.raises(tying.errors.AdapterFileError, match="depends on the input"):
        export_peft(m, tmp_path / "peft")
    with pytest.raises(ServingError, match="depends on the input"):
        tying.load_adapters_(Stack(layers=1), {"r": tmp_path / "ad"})


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_family_presets_train_and_static_ones_merge_exactly(name, tokens):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec(name, **KNOBS[name]))
    randomize_bank(model)
    task = {"task": "a"} if name == "mtl-lora" else {}
    with tying.adapters(model, "a") if task else torch.enable_grad():
        out = model(tokens).logits
    out.square().mean().backward()
    trained = {n: p for n, p in tying.bank_of(model).named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None for n, p in trained.items() if "#b" not in n)  # b's rows: no grad
    if name in ROUTED:
        with pytest.raises(NotMergeableError, match="router"):
            tying.merge_(model)
        return
    with torch.no_grad():
        tying.merge_(model, **task)
        assert torch.allclose(model(tokens).logits, out, atol=1e-5)


def _peft_lily_and_vblora():
    peft = pytest.importorskip("peft")
    return peft, [peft.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj"]),
                  peft.VBLoRAConfig(r=4, num_vectors=32, vector_length=16, topk=2, target_modules=["q_proj", "v_proj"])]


def test_family_counts_equal_peft_s():
    peft, _ = _peft_lily_and_vblora()
    from tying.integrations.peft_imports import peft_targets
    qv = peft_targets(["q_proj", "v_proj"])
    for (r, s, nb), layers in (((4, 2, 3), 6), ((8, 1, 2), 5), ((6, 3, 4), 6)):
        ours = tying.count(tiny_llama(layers=layers), "lily", rank=r, stride_a=s, num_b=nb, targets=qv)
        theirs = peft.get_peft_model(tiny_llama(layers=layers), peft.LilyConfig(
            r=r, stride_A=s, num_B=nb, target_modules=["q_proj", "v_proj"])).get_nb_trainable_parameters()[0]
        assert ours.trainable == theirs
    for r, nv, length, k in ((4, 32, 16, 2), (2, 64, 8, 3)):
        ours = tying.count(tiny_llama(), "vb-lora", rank=r, num_vectors=nv, vector_length=length, topk=k, targets=qv)
        theirs = peft.get_peft_model(tiny_llama(), peft.VBLoRAConfig(
            r=r, num_vectors=nv, vector_length=length, topk=k, target_modules=["q_proj", "v_proj"]))
        assert ours.trainable == theirs.get_nb_trainable_parameters()[0]


def test_peft_s_lily_vblora_and_vera_folders_import_with_peft_s_outputs(tmp_path, tokens):
    peft, configs = _peft_lily_and_vblora()
    configs.append(peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=True))
    from tying.integrations.peft import import_peft
    for i, cfg in enumerate(configs):
        theirs = peft.get_peft_model(tiny_llama(), cfg)
        with torch.no_grad():  # a trained-looking adapter: every tensor PEFT trains, random
            for p in theirs.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
            want = theirs(input_ids=tokens).logits
        theirs.save_pretrained(tmp_path / str(i))
        ours = tiny_llama()
        counts = import_peft(ours, tmp_path / str(i))
        with torch.no_grad():
            assert torch.allclose(ours(tokens).logits, want, atol=1e-5), type(cfg).__name__
        assert counts.trainable == theirs.get_nb_trainable_parameters()[0]
        tying.save_adapter(ours, tmp_path / f"tying{i}")
        mine, peft_bytes = (tensor_bytes(f) for f in (tmp_path / f"tying{i}" / "adapter.safetensors",
                                                       tmp_path / str(i) / "adapter_model.safetensors"))
        if isinstance(cfg, peft.VeraConfig):  # PEFT slices one B for every width; tying keeps one B per width
            assert mine <= peft_bytes + 16 * 4 * 4  # (k/v's 16 rows again, in float32)
        else:  # each shared tensor once (VB-LoRA's bank PEFT writes once too; Lily's A and B, once per layer)
            assert mine <= peft_bytes
        if isinstance(cfg, peft.LilyConfig):
            assert mine < 0.7 * peft_bytes, (mine, peft_bytes)


def tensor_bytes(path) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def test_an_imported_folder_whose_shared_copies_differ_is_refused(tmp_path):
    peft, configs = _peft_lily_and_vblora()
    from safetensors.torch import load_file, save_file
    from tying.integrations.peft import import_peft
    peft.get_peft_model(tiny_llama(), configs[0]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(str(path))
    sd["base_model.model.model.layers.1.self_attn.q_proj.lily_A.weight"] += 1.0  # layers 0, 1 share one A
    save_file(sd, str(path))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(tying.errors.AdapterFileError, match="copies of A.* differ"):
        import_peft(model, tmp_path)
    assert same_state(model, before) and not tying.engine.banks(model)


def test_static_mixes_export_exactly_and_serve_in_mixed_batches(tmp_path, tokens):
    peft = pytest.importorskip("peft")
    from tying.integrations.peft import export_peft
    folders = {}
    for name in ("vb-lora", "mos"):
        model = tiny_llama()
        tying.apply_(model, tying.load_spec(name, **KNOBS[name]))
        randomize_bank(model, seed=len(folders) + 1)
        with torch.no_grad():
            ref = model(tokens).logits
        export_peft(model, tmp_path / f"peft-{name}")
        assert json.loads((tmp_path / f"peft-{name}" / "adapter_config.json").read_text())["peft_type"] == "LORA"
        served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / f"peft-{name}")
        with torch.no_grad():
            assert torch.allclose(served(input_ids=tokens).logits, ref, atol=1e-4)
        folders[name] = (tying.save_adapter(model, tmp_path / name), ref)
    mixed = tiny_llama()
    tying.load_adapters_(mixed, {n: f for n, (f, _) in folders.items()})
    with torch.no_grad(), tying.adapters(mixed, ["mos", "vb-lora"]):
        out = mixed(tokens).logits
    assert torch.allclose(out[0], folders["mos"][1][0], atol=1e-5)
    assert torch.allclose(out[1], folders["vb-lora"][1][1], atol=1e-5)
