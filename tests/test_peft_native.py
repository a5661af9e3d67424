"""A tied adapter inside PEFT's own API (issue 29): TyingConfig with get_peft_model, save_pretrained /
PeftModel.from_pretrained in a fresh process, merge and disable, TRL's SFTTrainer, lm-eval (issue 34: test_peft_api)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_bank, same_state, snapshot, tiny_gpt2, tiny_llama

import tying

peft = pytest.importorskip("peft")
from tying.integrations import peft as tp

if tp._peft_version() < tp.MIN_PEFT:
    pytest.skip("TyingConfig needs peft >= 0.21", allow_module_level=True)
TyingConfig = tp.TyingConfig
HERE = Path(__file__).parent


def _adapted(spec="tl6", rank=4, **kw):
    model = peft.get_peft_model(tiny_llama(), TyingConfig(spec=spec, rank=rank, task_type="CAUSAL_LM", **kw))
    randomize_bank(model.get_base_model())
    return model


def test_contract_save_pretrained_and_from_pretrained_in_a_fresh_process(tmp_path, tokens):
    model = _adapted()
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path / "ad")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert [k for k in saved if ".A." in k] == ["base_model.model.tying_adapters.A.model:layers:*:self_attn:*"]
    torch.save(tokens, tmp_path / "tokens.pt")
    code = f"""
import sys, torch
import tying  # registers the TYING method with PEFT (also when peft is imported after it)
import peft
sys.path.insert(0, {str(HERE)!r})
from conftest import tiny_llama
model = peft.PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / 'ad')!r})
with torch.no_grad():
    torch.save(model(input_ids=torch.load({str(tmp_path / 'tokens.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "out.pt"), ref, atol=1e-5)


def test_trainable_counts_merge_disable_and_unload(tokens):
    model = _adapted()
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == tying.count(tiny_llama(), tying.load_spec("tl6", rank=4)).trainable
    base = tiny_llama()
    with torch.no_grad():
        adapted = model(input_ids=tokens).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=tokens).logits, base(input_ids=tokens).logits)
        assert torch.equal(model(input_ids=tokens).logits, adapted)
        model.merge_adapter()
        assert torch.allclose(model(input_ids=tokens).logits, adapted, atol=1e-5)
        model.unmerge_adapter()
        plain = model.merge_and_unload()
        assert not hasattr(plain, "tying_bank") and type(plain).__name__ == "LlamaForCausalLM"
        assert torch.allclose(plain(input_ids=tokens).logits, adapted, atol=1e-5)


def test_a_bad_spec_is_refused_when_the_config_is_built():
    with pytest.raises(tying.errors.SpecError, match="unknown preset 'tl99'"):
        TyingConfig(spec="tl99")
    with pytest.raises(tying.errors.SpecError, match="adapter.rank"):
        TyingConfig(spec="tl6", rank=0)


def test_loading_into_another_architecture_is_refused(tmp_path):
    _adapted(target_set="attn_qkv").save_pretrained(tmp_path / "ad")
    gpt2 = tiny_gpt2()
    before = snapshot(gpt2)
    with pytest.raises(tying.errors.TyingError):
        peft.PeftModel.from_pretrained(gpt2, tmp_path / "ad")
    assert same_state(gpt2, before) and not hasattr(gpt2, "tying_bank")


def test_saved_config_rebuilds_the_resolved_spec(tmp_path):
    model = _adapted(spec="tl6", target_set="all_linear", alpha=8.0)
    model.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TYING" and cfg["target_set"] is None and cfg["alpha"] is None
    spec = tying.load_spec(cfg["spec"])
    assert spec == tying.bank_of(model.get_base_model()).spec and spec.adapter.alpha == 8.0
    assert len(spec.targets) == 4  # q/k/v, o, gate/up, down: the model's all_linear set


def test_trl_sft_trainer_takes_a_tying_config(tmp_path):
    trl = pytest.importorskip("trl")
    import transformers
    from datasets import Dataset
    from test_tasks import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=len(tok), pad_token_id=0, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    data = Dataset.from_dict({"text": [f"{i} plus {i} is {2 * i}" for i in range(16)]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                         max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=TyingConfig(spec="tl6", rank=4, task_type="CAUSAL_LM"))
    inner = trainer.model.get_base_model()
    before = {k: v.clone() for k, v in tying.bank_of(inner).state_dict().items()}
    trainer.train()
    after = tying.bank_of(inner).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.model.save_pretrained(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "TYING"


LM_EVAL_TASK = """task: tying_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:"
doc_to_choice: [" yes", " no"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _lm_eval_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "yesno.jsonl"
    data.write_text("".join(json.dumps({"question": f"Is {a} bigger than {b}?", "label": int(a < b)}) + "\n"
                            for a, b in [(2, 1), (1, 2), (5, 3), (3, 5), (7, 4), (4, 7)]))
    (folder / "tying_yesno.yaml").write_text(LM_EVAL_TASK.format(data=data))
    return folder


def test_lm_eval_on_an_adapted_model_and_through_its_peft_argument(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from test_tasks import char_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = TaskManager(include_path=str(_lm_eval_task(tmp_path / "tasks")))
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=len(tok), pad_token_id=0, eos_token_id=2)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, TyingConfig(spec="tl6", rank=4, task_type="CAUSAL_LM"))
    randomize_bank(model.get_base_model(), seed=3)
    model.save_pretrained(tmp_path / "ad")

    def scores(lm):  # each example's log-likelihood of each choice
        out = lm_eval.simple_evaluate(model=lm, tasks=["tying_yesno"], task_manager=tasks, bootstrap_iters=0,
                                      log_samples=True)
        return torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in out["samples"]["tying_yesno"]])
    direct = scores(HFLM(pretrained=model.get_base_model(), tokenizer=tok, batch_size=2))
    through_peft = scores(HFLM(pretrained=str(tmp_path / "base"), peft=str(tmp_path / "ad"), tokenizer=tok,
                               batch_size=2, device="cpu"))
    assert torch.allclose(direct, through_peft, atol=1e-4)
    merged = model.merge_and_unload()  # merged, then unapplied: a plain model computing the same
    assert torch.allclose(scores(HFLM(pretrained=merged, tokenizer=tok, batch_size=2)), direct, atol=1e-4)
    # the lm-eval command line, in a process that never imports tying (the installed bridge teaches PEFT the method)
    cli = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                          f"pretrained={tmp_path / 'base'},peft={tmp_path / 'ad'},tokenizer={tmp_path / 'base'}",
                          "--tasks", "tying_yesno", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                          "--batch_size", "2", "--output_path", str(tmp_path / "cli"), "--log_samples"],
                         capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    logged = next((tmp_path / "cli").rglob("samples_tying_yesno_*.jsonl")).read_text().splitlines()
    by_doc = {json.loads(line)["doc_id"]: [float(r[0]) for r in json.loads(line)["filtered_resps"]] for line in logged}
    assert torch.allclose(torch.tensor([by_doc[i] for i in sorted(by_doc)]), direct, atol=1e-4)


PINNED = """
import json, sys, tempfile, torch
import tying, peft
sys.path.insert(0, {here!r})
from conftest import tiny_llama, randomize_bank
from tying.integrations import peft as tp
print("peft", peft.__version__)
try:
    cfg = tp.TyingConfig(spec="tl6", rank=4, task_type="CAUSAL_LM")
except ImportError as e:
    print("refused:", e)
    raise SystemExit(0)
m = peft.get_peft_model(tiny_llama(), cfg)
randomize_bank(m.get_base_model())
ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
d = tempfile.mkdtemp()
m.save_pretrained(d)
with torch.no_grad():
    same = torch.allclose(peft.PeftModel.from_pretrained(tiny_llama(), d)(input_ids=ids).logits, m(input_ids=ids).logits,
                          atol=1e-5)
print("round trip:", same)
"""


@pytest.mark.slow
@pytest.mark.parametrize("version, expect", [("0.21.0", "round trip: True"), ("0.20.0", "refused: TyingConfig needs peft >= 0.21")])
def test_the_oldest_supported_peft_and_the_one_before(tmp_path, version, expect):
    """The TyingConfig path on PEFT 0.21.0 (the first that asks a method's tuner for its state dict; the newest is
    what the suite runs), and a clear refusal on 0.20. Downloads PEFT from the package registry."""
    target = tmp_path / "peft"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          f"peft=={version}"], capture_output=True, text=True, timeout=600, check=False)
    if pip.returncode:
        pytest.skip(f"peft {version} could not be installed here: {pip.stderr[-300:]}")
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", PINNED.format(here=str(HERE))], capture_output=True, text=True,
                         timeout=600, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"peft {version}" in out.stdout and expect in out.stdout, out.stdout
