"""Hugging Face habits never lose data: save_pretrained / from_pretrained, state_dict layouts, the Trainer's
and TRL's checkpoints (adapter-only with TyingTrainer), torch.distributed.checkpoint."""

import shutil

import pytest
import torch
from conftest import randomize_bank, tiny_gpt2, tiny_llama

import tying

transformers = pytest.importorskip("transformers")
FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_save_pretrained_keeps_the_base_loadable(tmp_path, fam, tokens):
    """The silent loss: from_pretrained of an adapted model's save_pretrained must give the base back exactly
    (before, q/k/v were saved as ``...base.weight``, reported unexpected and re-initialised at random)."""
    base = FAMILIES[fam]()
    with torch.no_grad():
        ref = base(tokens).logits
    plain_keys = list(base.state_dict())
    tying.apply_(base, tying.load_spec("tl6", rank=4))
    randomize_bank(base)
    keys = list(base.state_dict())
    assert [k for k in keys if not k.startswith("tying_bank.")] == plain_keys
    base.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, ref)


def test_load_state_dict_accepts_plain_adapted_and_old_layouts(tokens):
    donor = tiny_llama()
    tying.apply_(donor, tying.load_spec("tl6", rank=4))
    randomize_bank(donor)
    with torch.no_grad():
        want = donor(tokens).logits
    full = donor.state_dict()
    old = {k.replace("q_proj.", "q_proj.base.").replace("k_proj.", "k_proj.base.").replace("v_proj.", "v_proj.base.")
           if "tying_bank" not in k else k: v for k, v in full.items()}
    for state in (full, old):
        model = tiny_llama(seed=5)
        tying.apply_(model, tying.load_spec("tl6", rank=4))
        assert not model.load_state_dict(state).missing_keys
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, want)
    # a plain base checkpoint: base weights load, the factors keep their values, nothing is reported missing
    model = tiny_llama(seed=5)
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model, seed=3)
    bank = {k: v.clone() for k, v in tying.bank_of(model).state_dict().items()}
    result = model.load_state_dict(tiny_llama().state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, bank[k]) for k, v in tying.bank_of(model).state_dict().items())
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight)


def test_checkpoint_missing_a_base_key():
    model = tiny_llama(seed=5)
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    plain = tiny_llama().state_dict()
    del plain["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"model.layers.1.mlp.up_proj.weight\"\."):
        model.load_state_dict(plain)  # torch's error names exactly the base key, not the factors
    missing = model.load_state_dict(plain, strict=False).missing_keys
    assert missing == ["model.layers.1.mlp.up_proj.weight"]


def test_wrapper_exposes_base_attributes():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    tying.apply_(model, tying.load_spec("lora", rank=2))
    site = model.model.layers[0].self_attn.q_proj
    assert site is not q and site.weight is q.weight and site.in_features == 32
    with pytest.raises(AttributeError):
        _ = site.no_such_attribute


def test_distributed_checkpoint_round_trip(tmp_path, tokens):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    state = get_model_state_dict(model)
    assert "model.layers.0.self_attn.q_proj.weight" in state
    with pytest.warns(UserWarning):  # single process: dcp says so
        dcp.save(state, checkpoint_id=tmp_path)
    other = tiny_llama(seed=4)
    tying.apply_(other, tying.load_spec("tl6", rank=4))
    target = get_model_state_dict(other)
    with pytest.warns(UserWarning):
        dcp.load(target, checkpoint_id=tmp_path)
    set_model_state_dict(other, target)
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, model(tokens).logits)


# ---- Trainer and TRL -------------------------------------------------------------------------------------------

def _data(n=12, length=8):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 100, (2, length), generator=g).repeat(n // 2, 1)  # two sequences: learnable
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def _trainer(tmp_path, spec="tl6", max_steps=6, cls=None):
    from tying.integrations.transformers import TyingTrainer

    torch.manual_seed(0)
    model = tiny_llama()
    tying.apply_(model, tying.load_spec(spec, rank=4))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, save_steps=3,
                                          per_device_train_batch_size=2, learning_rate=5e-2, report_to=[],
                                          use_cpu=True, seed=0, logging_steps=1, save_strategy="steps",
                                          lr_scheduler_type="constant",
                                          disable_tqdm=True, dataloader_num_workers=0)
    return (cls or TyingTrainer)(model=model, args=args, train_dataset=_data())


def _bank(trainer):
    return {k: v.detach().clone() for k, v in tying.bank_of(trainer.model).state_dict().items()}


def test_trainer_writes_adapter_only_checkpoints_and_resumes_exactly(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"spec.yaml", "adapter.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    assert (ckpt / "adapter.safetensors").stat().st_size < base_bytes / 5
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]

    resumed = _trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    want, got = _bank(straight), _bank(resumed)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)

    fresh = tiny_llama()  # the adapter folder is an ordinary tying adapter
    tying.load_adapter(fresh, tmp_path / "a" / "checkpoint-6")
    assert all(torch.equal(v, want[k]) for k, v in tying.bank_of(fresh).state_dict().items())


def test_resume_with_a_different_spec_changes_nothing(tmp_path):
    first = _trainer(tmp_path / "a", max_steps=3)
    first.train()
    other = _trainer(tmp_path / "b", spec="lora")
    before = _bank(other)
    with pytest.raises(tying.errors.AlreadyAppliedError, match="checkpoint-3 holds an adapter whose spec differs"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert all(torch.equal(v, before[k]) for k, v in _bank(other).items())


def test_a_checkpoint_of_another_setup_is_refused_before_anything_loads(tmp_path):
    """An FSDP checkpoint (accelerate's optimizer.bin) resumed without FSDP, or a plain one (optimizer.pt) under FSDP:
    the Trainer loaded the adapter and then failed on the optimizer (FileNotFoundError: .../optimizer.pt); now a
    ShardingError before anything is loaded."""
    first = _trainer(tmp_path / "a", max_steps=3)
    first.train()
    plain = tmp_path / "a" / "checkpoint-3"
    fsdp = tmp_path / "fsdp"
    shutil.copytree(plain, fsdp)
    (fsdp / "optimizer.pt").rename(fsdp / "optimizer.bin")
    other = _trainer(tmp_path / "b")
    before = _bank(other)
    with pytest.raises(tying.errors.ShardingError, match=r"was saved under FSDP .*this run is not an FSDP run"):
        other.train(resume_from_checkpoint=str(fsdp))
    other.is_fsdp_enabled = True  # what accelerate sets under FSDP; the check runs before the Trainer reads anything
    with pytest.raises(tying.errors.ShardingError, match=r"was saved without FSDP \(optimizer.pt\), and this run is"):
        other._load_from_checkpoint(str(plain))
    assert all(torch.equal(v, before[k]) for k, v in _bank(other).items())


def test_adapter_checkpoint_into_a_model_of_another_shape(tmp_path):
    first = _trainer(tmp_path, max_steps=3)
    first.train()
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100))
    with pytest.raises(tying.errors.AdapterFileError, match="shape mismatch"):
        tying.load_adapter(wider, tmp_path / "checkpoint-3")
    assert not hasattr(wider, "tying_bank")


def test_plain_trainer_checkpoint_keeps_base_and_resumes(tmp_path):
    """Without TyingTrainer the Trainer saves the whole model; its base keys are the plain ones."""
    plain = _trainer(tmp_path / "a", cls=transformers.Trainer)
    plain.train()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-3")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight)
    resumed = _trainer(tmp_path / "b", cls=transformers.Trainer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    want = _bank(plain)
    for k, v in _bank(resumed).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)


def _tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(97)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def test_trl_sft_trainer_adapter_checkpoints(tmp_path, tokens):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tying.integrations.transformers import adapter_trainer

    torch.manual_seed(0)
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    text = [" ".join(f"w{(i * 7 + j) % 97}" for j in range(10)) for i in range(4)] * 4
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=8, save_steps=4, per_device_train_batch_size=4,
                        learning_rate=5e-2, report_to=[], use_cpu=True, seed=0, logging_steps=1, max_length=16,
                        disable_tqdm=True, dataloader_num_workers=0, bf16=False)  # TRL's default casts to bf16
    trainer = adapter_trainer(trl.SFTTrainer)(model=model, args=cfg, processing_class=_tiny_tokenizer(),
                                              train_dataset=datasets.Dataset.from_dict({"text": text}))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    ckpt = tmp_path / "checkpoint-8"
    assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    fresh = tiny_llama()
    tying.load_adapter(fresh, ckpt)
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, model.eval()(tokens).logits)


def test_a_gathered_state_dict_saves_the_same_adapter_folder(tmp_path, tokens):
    """Under FSDP (FULL_STATE_DICT) the Trainer hands _save the state dict it gathered, the model's own tensors being
    shards: TyingTrainer writes the adapter folder from it, the same as tying.save_adapter (train_modules too)."""
    import transformers
    from safetensors.torch import load_file
    from tying.integrations.transformers import TyingTrainer

    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4, train_modules=["lm_head"]))
    randomize_bank(model)
    args = transformers.TrainingArguments(str(tmp_path / "o"), report_to=[], use_cpu=True)
    trainer = TyingTrainer(model=model, args=args)
    trainer._save(str(tmp_path / "gathered"), state_dict={k: v.clone() for k, v in model.state_dict().items()})
    tying.save_adapter(model, tmp_path / "direct")
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("gathered", "direct"))
    assert a.keys() == b.keys() and "modules.lm_head.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    fresh = tiny_llama()
    tying.load_adapter(fresh, tmp_path / "gathered", replace_modules=True)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)
