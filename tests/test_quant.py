"""Quantized bases (integrations/quant.py): bitsandbytes 4-bit and 8-bit, torchao int8 weight-only, loaded the way
transformers users load them (``quantization_config=``), on the CPU."""

import warnings

import pytest
import torch
from conftest import lm_steps, same_state, snapshot

import tying
from tying import modtypes

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
warnings.filterwarnings("ignore", message="MatMul8bitLt")

QUANTS = ["nf4", "int8", "torchao-int8"]
TYPES = {"nf4": "Linear4bit", "int8": "Linear8bitLt", "torchao-int8": "TorchAOLinear"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Llama written with save_pretrained (widths that bitsandbytes' CPU packing accepts; d_in of
    q/k/v 128 spans two 4-bit blocks, so a decode that mixes up the blocks' scales shows)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(path, quant):
    import transformers
    from tying.integrations.quant import config

    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config(quant), device_map="cpu")


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def test_contract_nf4_tl6(saved, ids, tmp_path):
    """The issue's contract: a 4-bit (nf4) reload takes tl6; two AdamW steps change the loss; the adapter saved
    alone loads into a fresh 4-bit copy with equal logits; merge_ refuses, naming the module and the option."""
    model = load(saved, "nf4")
    counts = tying.apply_(model, tying.load_spec("tl6", rank=4))
    assert counts.trainable > 0
    assert {w.mtype.name for _, w in tying.engine.wrappers(model)} == {"Linear4bit"}
    assert all(p.dtype == torch.float32 for p in model.tying_bank.parameters())
    losses = lm_steps(model, ids, 2, 1e-2)
    with torch.no_grad():
        final = model(input_ids=ids, labels=ids).loss.item()
    assert final != losses[0]
    tying.save_adapter(model, tmp_path / "a")
    fresh = load(saved, "nf4")
    tying.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-5)
    before = snapshot(model)
    with pytest.raises(tying.errors.TyingError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*quantized "
                       r"Linear4bit.*tying\.merge_\(model, dequantize=True\)"):
        tying.merge_(model)
    assert same_state(model, before)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("preset", ["lora", "tl6", "vera", "tied-dora"])
def test_presets_train_save_and_load_on_each_quantized_type(saved, ids, tmp_path, quant, preset):
    model = load(saved, quant)
    tying.apply_(model, tying.load_spec(preset, rank=4))
    assert {w.mtype.name for _, w in tying.engine.wrappers(model)} == {TYPES[quant]}
    losses = lm_steps(model, ids, 6, 3e-2)
    assert losses[-1] < losses[0]
    tying.save_adapter(model, tmp_path / "a")
    fresh = load(saved, quant)
    tying.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("quant", QUANTS)
def test_explicit_merge_decodes_adds_and_reencodes(saved, ids, quant):
    """merge_(dequantize=True) is lossy but close; unmerge brings the base back to its quantized values' scale."""
    model = load(saved, quant)
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    for p in model.tying_bank.parameters():
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        tying.merge_(model, dequantize=True)
        merged = model(input_ids=ids).logits
        with pytest.raises(tying.errors.NotMergeableError, match="dequantize=True"):
            tying.unmerge_(model)
        tying.unmerge_(model, dequantize=True)
        back = model(input_ids=ids).logits
        tying.unapply_(model)
        base = model(input_ids=ids).logits
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() < 0.25 * scale  # re-encoding noise, not a lost update
    assert (merged - unmerged).abs().max() < (unmerged - base).abs().max()  # the update is there
    assert (back - base).abs().max() < 0.25 * scale


def test_merge_after_an_inference_pass_reads_bitsandbytes_cpu_layout(saved, ids):
    """In eval mode bitsandbytes repacks 4-bit weights into a CPU layout on the first forward; the weight read
    back through bitsandbytes' own API equals the one before the pass."""
    model = load(saved, "nf4")
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    q = model.model.layers[0].self_attn.q_proj
    before = q.mtype.weight(q.base).clone()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    if not getattr(q.base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no avx512bf16: bitsandbytes does not repack")
    assert torch.allclose(q.mtype.weight(q.base), before, atol=2e-2 * before.abs().max())  # bf16 scales when packed
    assert getattr(q.base.weight.quant_state, "packing_format_for_cpu", False)  # reading changed nothing
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        tying.merge_(model, dequantize=True)  # the update is zero (v = 0): the merge re-encodes the same weight
        assert (model(input_ids=ids).logits - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_tying_trainer_accepts_a_quantized_model_with_tying_factors(saved, tmp_path):
    pytest.importorskip("accelerate")
    import transformers
    from datasets import Dataset
    from tying.integrations.transformers import TyingTrainer

    model = load(saved, "nf4")
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6]] * 8, "labels": [[1, 2, 3, 4, 5, 6]] * 8})
    args = transformers.TrainingArguments(tmp_path / "out", max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="no")
    with pytest.raises(ValueError, match="purely quantized"):  # what users see without trainable adapters
        TyingTrainer(model=model, args=args, train_dataset=data)
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    before = {k: v.clone() for k, v in model.tying_bank.state_dict().items()}
    trainer = TyingTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert not getattr(model, "_hf_peft_config_loaded", False)  # the flag is not left behind
    after = model.tying_bank.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_served_mixed_batch_on_a_quantized_base(saved, ids, tmp_path):
    folders = {}
    for i, preset in enumerate(["tl6", "lora"]):
        m = load(saved, "nf4")
        tying.apply_(m, tying.load_spec(preset, rank=4))
        for p in m.tying_bank.parameters():
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(i))
        folders[preset] = tying.save_adapter(m, tmp_path / preset)
    served = load(saved, "nf4")
    tying.load_adapters_(served, folders)
    names = ["tl6", "lora"]
    with torch.no_grad(), tying.adapters(served, names):
        mixed = served(input_ids=ids).logits
    for row, name in enumerate(names):
        alone = load(saved, "nf4")
        tying.load_adapter(alone, folders[name])
        with torch.no_grad():
            assert torch.allclose(mixed[row], alone(input_ids=ids[row:row + 1]).logits[0], atol=1e-4)


def test_missing_library_names_the_extra(monkeypatch):
    import importlib

    from tying.integrations import quant

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"pip install 'tying\[quant\]'"):
        quant.config("nf4")
    with pytest.raises(tying.errors.TyingError, match="unknown quantization"):
        quant.config("int3")


def test_a_quantized_weight_no_type_decodes_is_refused():
    """A Linear whose weight comes from a quantization library but matches no registered type is not adapted as a
    plain Linear (that would add floats to encoded data)."""

    class Encoded(torch.Tensor):
        pass
    Encoded.__module__ = "torchao.prototype.fake"
    net = torch.nn.Module()
    net.lin = torch.nn.Linear(8, 8)
    net.lin.weight = torch.nn.Parameter(torch.randn(8, 8).as_subclass(Encoded), requires_grad=False)
    spec = {"targets": [{"select": "lin"}], "adapter": {"rank": 2, "factors": {"A": {"init": "zeros"},
                                                                            "B": {"init": "zeros"}}}}
    with pytest.raises(tying.errors.UnsupportedModuleError, match="Encoded weight .*no registered module type decodes"):
        tying.apply_(net, spec)
    assert modtypes.lookup(torch.nn.Linear(2, 2)).name == "Linear"
