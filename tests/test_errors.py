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
    assert not any(isinstance(m, tying.layers.TiedAdapter) for m in model.modules())


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
    check(llama, errors.UnsupportedModuleError, r"is a LlamaRMSNorm.*supported: Linear, Conv1D, Conv1d, Conv2d, Embedding",
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
    check(llama, errors.AdapterFileError, r"does not fit this model|matches no module",
          lambda m: tying.load_adapter(tiny_gpt2(), saved))  # GPT-2 has other module names
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
    check(llama, errors.AdapterFileError, r"spec\.yaml not found", lambda m: tying.load_adapter(m, tmp_path))
