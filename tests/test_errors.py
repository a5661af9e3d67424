"""Every failure is a tying.errors exception whose message says what, where and how to fix it,
and leaves the model exactly as it was."""

import pickle

import pytest
import torch
from conftest import same_state, snapshot, tiny_gpt2, tiny_llama

import tying
from tying import errors

QKV = {"select": "model.layers.{layer}.self_attn.{proj:q_proj|k_proj|v_proj}"}


def spec_with(**adapter):
    base = {"rank": 4, "factors": {"A": {"tie": ["proj"], "init": "kaiming_uniform"}, "B": {"init": "zeros"}}}
    base.update(adapter)
    return {"targets": [QKV], "adapter": base}


@pytest.fixture
def llama():
    m = tiny_llama()
    yield m, snapshot(m)


def check(llama, exc, match, fn):
    model, snap = llama
    with pytest.raises(exc, match=match):
        fn(model)
    assert same_state(model, snap) and not hasattr(model, "tying_bank")
    assert not any(isinstance(m, tying.site.SiteAdapter) for m in model.modules())


def test_selector_matches_nothing_lists_closest(llama):
    spec = {**spec_with(), "targets": [{"select": "model.layers.{layer}.self_attn.{proj:qq_proj}"}]}
    check(llama, errors.SelectorError, r"matches no module; closest module names: .*self_attn\.q_proj",
          lambda m: tying.apply_(m, spec))


def test_unknown_key_gives_field_path(llama, tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("targets: [{select: 'x.*'}]\nadapter:\n  rank: 4\n  factors:\n    A: {init: zeros, tye: [layer]}\n"
                 "    B: {init: zeros}\n")
    check(llama, errors.SpecError, r"adapter\.factors\.A\.tye: unknown key", lambda m: tying.apply_(m, str(p)))


def test_wrong_type_gives_field_path(llama):
    check(llama, errors.SpecError, r"adapter\.rank: Input should be a valid integer",
          lambda m: tying.apply_(m, spec_with(rank="eight")))


@pytest.mark.parametrize("rank,match", [(0, r"adapter\.rank: Input should be greater than 0"),
                                        (64, r"rank 64 is larger than module 'model\.layers\.0\.self_attn\.q_proj'")])
def test_bad_rank(llama, rank, match):
    check(llama, errors.SpecError, match, lambda m: tying.apply_(m, spec_with(rank=rank)))


def test_yaml_syntax_error_has_line(llama, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("targets:\n  - select: [unclosed\nadapter: {}\n")
    check(llama, errors.SpecError, r"YAML syntax error in .*bad\.yaml at line \d+", lambda m: tying.apply_(m, p))


def test_missing_spec_file_and_unknown_preset(llama):
    check(llama, errors.SpecError, r"spec file not found: nope/spec\.yaml", lambda m: tying.apply_(m, "nope/spec.yaml"))
    check(llama, errors.SpecError, r"unknown preset 'tl7'.*presets: lora", lambda m: tying.apply_(m, "tl7"))


@pytest.mark.parametrize("select,match", [("re:layers.(?P<layer", r"invalid regex in selector"),
                                          ("", r"empty selector"), ("a.{b", r"unbalanced brace")])
def test_invalid_selectors(llama, select, match):
    spec = {**spec_with(), "targets": [{"select": select}]}
    check(llama, errors.SpecError, rf"targets\.0\.select: .*{match}", lambda m: tying.apply_(m, spec))


def test_tie_on_unknown_capture(llama):
    spec = spec_with(factors={"A": {"tie": ["block"], "init": "zeros"}, "B": {"init": "zeros"}})
    check(llama, errors.SpecError, r"adapter\.factors\.A\.tie names capture 'block'.*known captures: \['layer', 'proj'\]",
          lambda m: tying.apply_(m, spec))


def test_incompatible_shapes_name_members(llama):
    # GQA: q_proj outputs 32, k_proj and v_proj 16, so one B cannot serve all three
    spec = spec_with(factors={"A": {"tie": ["proj"], "init": "zeros"}, "B": {"tie": ["proj"], "init": "zeros"}})
    check(llama, errors.TieError, r"factor B cannot be shared in tie group 'model:layers:0:self_attn:\*'.*"
          r"32x4: model\.layers\.0\.self_attn\.q_proj; 16x4: .*k_proj.*shape_aware", lambda m: tying.apply_(m, spec))


def test_shape_aware_splits_instead(llama):
    model, _ = llama
    spec = spec_with(factors={"A": {"tie": ["proj"], "init": "zeros"},
                              "B": {"tie": ["layer", "proj"], "shape_aware": True, "init": "zeros"}})
    c = tying.apply_(model, spec)
    assert c.by_factor["B"]["groups"] == 2 and c.by_factor["B"]["trainable"] == 32 * 4 + 16 * 4


def test_unsupported_module_lists_supported(llama):
    spec = {**spec_with(), "targets": [{"select": "model.layers.{layer}.{proj:input_layernorm}"}]}
    check(llama, errors.UnsupportedModuleError, r"is a LlamaRMSNorm.*supported: Linear, Conv1d, Conv2d, Embedding, Conv1D",
          lambda m: tying.apply_(m, spec))


def test_two_selectors_claim_one_module(llama):
    spec = {**spec_with(), "targets": [QKV, {"select": "re:.*\\.q_proj"}]}
    check(llama, errors.ConflictError, r"'model\.layers\.0\.self_attn\.q_proj' is claimed by targets\[0\] and targets\[1\]",
          lambda m: tying.apply_(m, spec))


def test_applying_twice(llama):
    model, _ = llama
    tying.apply_(model, "tl6")
    snap = snapshot(model)
    with pytest.raises(errors.AlreadyAppliedError, match="already carries a tying adapter.*unapply_"):
        tying.apply_(model, "lora")
    assert same_state(model, snap)


def test_not_applied():
    with pytest.raises(errors.NotAppliedError, match="carries no tying adapter"):
        tying.save_adapter(tiny_llama(), "unused")


def test_vector_factor_with_matrix_init(llama):
    spec = spec_with(factors={"A": {"init": "zeros"}, "B": {"init": "zeros"}, "u": {"init": "orthogonal"}})
    check(llama, errors.SpecError, r"adapter\.factors: .*factor u is a vector", lambda m: tying.apply_(m, spec))


def test_bucket_on_non_integer_capture(llama):
    spec = spec_with(factors={"A": {"tie": [{"capture": "proj", "every": 2}], "init": "zeros"}, "B": {"init": "zeros"}})
    check(llama, errors.TieError, r"every=2 needs integer values, got 'q_proj'", lambda m: tying.apply_(m, spec))


def test_unknown_override():
    with pytest.raises(errors.SpecError, match=r"unknown override\(s\) \['rnak'\]"):
        tying.load_spec("tl6", rnak=4)


# ---- adapter files -------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    m = tiny_llama()
    tying.apply_(m, tying.load_spec("tl6", rank=4))
    tying.save_adapter(m, tmp_path / "ad")
    return tmp_path / "ad"


def test_adapter_from_a_different_model(llama, saved):
    gpt2 = tiny_gpt2()  # other module names
    check((gpt2, snapshot(gpt2)), errors.AdapterFileError, r"does not fit this model|matches no module",
          lambda m: tying.load_adapter(m, saved))
    bigger = tiny_llama(layers=4)
    snap = snapshot(bigger)
    with pytest.raises(errors.AdapterFileError, match=r"missing factors \[.*layers:3"):
        tying.load_adapter(bigger, saved)
    assert same_state(bigger, snap)


def test_truncated_adapter_file(llama, saved):
    f = saved / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    check(llama, errors.AdapterFileError, r"adapter\.safetensors", lambda m: tying.load_adapter(m, saved))


def test_pickle_offered_as_adapter_is_refused_unread(llama, saved):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))
    (saved / "adapter.safetensors").write_bytes(pickle.dumps({"A": Boom()}))
    torch.save({"x": torch.ones(2)}, saved / "other.pt")
    check(llama, errors.AdapterFileError, r"not a readable safetensors file.*never unpickles",
          lambda m: tying.load_adapter(m, saved))


def test_missing_adapter_files(llama, tmp_path):
    check(llama, errors.AdapterFileError, r"adapter\.safetensors not found: an adapter folder holds spec\.yaml",
          lambda m: tying.load_adapter(m, tmp_path))


# ---- more malformed specs: each names the field -------------------------------------------------

def _factors(**over):
    f = {"A": {"tie": ["proj"], "init": "kaiming_uniform"}, "B": {"init": "zeros"}}
    f.update(over)
    return f


@pytest.mark.parametrize("spec,match", [
    ({**spec_with(), "version": 2}, r"version: Input should be 1"),
    (spec_with(dropout=1.0), r"adapter\.dropout: Input should be less than 1"),
    (spec_with(alpha=0), r"adapter\.alpha: Input should be greater than 0"),
    ({**spec_with(), "targets": [{**QKV, "types": ["Linearr"]}]}, r"targets\.0\.types: .*unsupported module type"),
    ({**spec_with(), "targets": []}, r"targets: List should have at least 1 item"),
    ({"targets": [QKV]}, r"adapter: Field required"),
    (spec_with(factors=_factors(C={"init": "zeros"})), r"adapter\.factors: a lora adapter .*not allowed \['C'\]"),
    (spec_with(factors={"A": {"init": "zeros"}}), r"a lora adapter needs factors \['A', 'B'\].*missing \['B'\]"),
    (spec_with(factors=_factors(A={"init": {"kind": "normal", "std": -1}})), r"factors\.A\.init\.std: .*greater than 0"),
    (spec_with(factors=_factors(A={"tie": [{"capture": "layer", "every": 0}], "init": "zeros"})), r"tie\.0\.every"),
    (spec_with(factors=_factors(A={"tie": [{"capture": "layer", "groups": [[0, 1], [1, 2]]}], "init": "zeros"})),
     r"a value appears in two groups"),
    (spec_with(factors=_factors(A={"tie": "some", "init": "zeros"})), r"adapter\.factors\.A\.tie"),
    (spec_with(factors=_factors(A={"init": {"kind": "xavier"}})), r"factors\.A\.init\.kind: Input should be 'zeros'"),
    ({**spec_with(), "targets": [{**QKV, "exclude": ["re:("]}]}, r"targets\.0\.exclude\.0: invalid regex"),
    ({**spec_with(), "targets": [{"select": "a.{x}.{x}"}]}, r"invalid glob selector .*redefinition"),
])
def test_malformed_specs(llama, spec, match):
    check(llama, errors.SpecError, match, lambda m: tying.apply_(m, spec))


def test_top_level_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(errors.SpecError, match=r"top level must be a mapping, got list"):
        tying.load_spec(p)
    with pytest.raises(errors.SpecError, match=r"cannot build a spec from a int"):
        tying.load_spec(3)


def test_layer_in_no_explicit_group(llama):
    spec = spec_with(factors=_factors(B={"tie": [{"capture": "layer", "groups": [[0, 1]]}], "init": "zeros"}))
    check(llama, errors.TieError, r"layer=2 is in no group of tie\.layer\.groups \[\[0, 1\]\]", lambda m: tying.apply_(m, spec))


def _edit_spec(folder, edit):
    """Rewrite the spec an adapter folder holds (spec.yaml and the copy its weights file carries)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(folder / "adapter.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["tying_spec"] = edit(meta["tying_spec"])
    save_file(tensors, str(folder / "adapter.safetensors"), metadata=meta)
    (folder / "spec.yaml").write_text(meta["tying_spec"])


def test_adapter_with_edited_rank(llama, saved):
    """The folder's spec and tensors disagree: the folder is blamed, not the model (issue 35, item 7)."""
    _edit_spec(saved, lambda text: text.replace("rank: 4", "rank: 2"))
    check(llama, errors.AdapterFileError, r"ad: the spec the folder holds and its tensors disagree \(A\.model:layers:\*:"
          r"self_attn:\* has shape \(4, 32\), but the spec's rank 2 gives it \(2, d_in\).*edited or damaged, whatever "
          "the model; nothing was loaded", lambda m: tying.load_adapter(m, saved))


def test_an_edited_spec_yaml_alone_is_reported_and_the_carried_spec_used(llama, saved):
    spec_file = saved / "spec.yaml"
    spec_file.write_text(spec_file.read_text().replace("rank: 4", "rank: 2"))
    model, _ = llama
    with pytest.warns(UserWarning, match="spec.yaml differs from the spec .* carries, which is used"):
        tying.load_adapter(model, saved)
    assert tying.bank_of(model).spec.adapter.rank == 4


def test_adapter_with_integer_tensors(llama, saved):
    from safetensors.torch import load_file, save_file
    t = load_file(str(saved / "adapter.safetensors"))
    save_file({k: v.to(torch.int64) for k, v in t.items()}, str(saved / "adapter.safetensors"))
    check(llama, errors.AdapterFileError, r"dtype mismatch: .* is torch.int64, the model's torch.float32",
          lambda m: tying.load_adapter(m, saved))


def test_empty_adapter_file(llama, saved):
    (saved / "adapter.safetensors").write_bytes(b"")
    check(llama, errors.AdapterFileError, r"not a readable safetensors file", lambda m: tying.load_adapter(m, saved))


def test_adapter_spec_with_unknown_key(llama, saved):
    _edit_spec(saved, lambda text: text + "extra_field: 1\n")
    check(llama, errors.SpecError, r"adapter\.safetensors \(the spec it carries\)\):\n  extra_field: unknown key",
          lambda m: tying.load_adapter(m, saved))


def test_fp16_adapter_loads_into_fp32_model(llama, saved):
    from safetensors.torch import load_file, save_file
    t = load_file(str(saved / "adapter.safetensors"))
    save_file({k: v.half() for k, v in t.items()}, str(saved / "adapter.safetensors"))
    model, _ = llama
    tying.load_adapter(model, saved)
    assert {p.dtype for p in model.tying_bank.parameters()} == {torch.float32}


# ---- nothing lost: atomic saves ------------------------------------------------------------------

def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    tying.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for p in model.tying_bank.parameters():
            p.add_(1.0)

    def crash_half_way(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # a partial write ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(tying.state, "save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        tying.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files either
    fresh = tiny_llama()
    tying.load_adapter(fresh, tmp_path)
    assert all(torch.equal(v, torch.ones_like(v)) for v in fresh.tying_bank["u"].values())


# ---- found in review: each was a silent corruption or a crash after mutation --------------------

def test_container_root_is_refused():
    with pytest.raises(errors.UnsupportedModuleError, match="root is an nn.Sequential.*wrap it"):
        tying.apply_(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"targets": [{"select": "0"}], "adapter": {
            "rank": 2, "factors": {"A": {"init": "zeros"}, "B": {"init": "zeros"}}}})


def test_multihead_attention_out_proj_is_refused():
    m = torch.nn.Module()
    m.mha = torch.nn.MultiheadAttention(8, 2)
    snap = snapshot(m)
    with pytest.raises(errors.UnsupportedModuleError, match="belongs to an nn.MultiheadAttention"):
        tying.apply_(m, {"targets": [{"select": "mha.out_proj"}], "adapter": {
            "rank": 2, "factors": {"A": {"init": "zeros"}, "B": {"init": "zeros"}}}})
    assert same_state(m, snap)


def test_tie_naming_a_capture_twice(llama):
    spec = spec_with(factors=_factors(A={"tie": ["layer", "layer"], "init": "zeros"}))
    check(llama, errors.SpecError, r"tie names a capture twice: \['layer', 'layer'\]", lambda m: tying.apply_(m, spec))


def test_load_into_merged_model_is_refused(saved):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    tying.merge_(model)
    snap = snapshot(model)
    with pytest.raises(errors.AlreadyAppliedError, match="adapter is merged; call tying.unmerge_"):
        tying.load_adapter(model, saved)
    assert same_state(model, snap)


def test_merge_refused_when_sites_share_a_weight():
    m = torch.nn.Module()
    m.emb, m.head = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 10, bias=False)
    m.head.weight = m.emb.weight  # tied embeddings
    tying.apply_(m, {"targets": [{"select": "emb"}, {"select": "head"}], "adapter": {"rank": 2, "factors": {
        "A": {"init": {"kind": "normal", "seed": 0}}, "B": {"init": {"kind": "normal", "seed": 1}}}}})
    snap = snapshot(m)
    with pytest.raises(tying.errors.NotMergeableError, match=r"shares its weight with"):
        tying.merge_(m)
    assert same_state(m, snap)


def test_a_plan_for_another_model_is_refused():
    p = tying.plan(tiny_llama(layers=2), tying.load_spec("tl6", rank=4))
    model = tiny_llama(layers=3)
    snap = snapshot(model)
    with pytest.raises(errors.TyingError, match="plan was made for a different model"):
        tying.apply_(model, p)
    assert same_state(model, snap)


def test_train_modules_count_shared_parameters_once():
    m = torch.nn.Module()
    m.body, m.emb, m.head = torch.nn.Linear(4, 4), torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    m.head.weight = m.emb.weight
    spec = {"targets": [{"select": "body"}], "train_modules": ["head", "emb"],
            "adapter": {"rank": 2, "factors": {"A": {"init": "zeros"}, "B": {"init": "zeros"}}}}
    c = tying.apply_(m, spec)
    assert c.modules == 40 == sum(p.numel() for p in m.parameters() if p.requires_grad) - c.by_factor["A"]["trainable"] \
        - c.by_factor["B"]["trainable"]
