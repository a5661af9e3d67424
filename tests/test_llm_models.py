"""integrations.llm.models: one loader for folders, GGUF files, hub ids and the built-in; device and dtype checks."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_tasks import char_tokenizer
from tying.integrations import transformers as tx
from tying.integrations.llm import models

import tying


def tiny_llm_folder(path, layers: int = 2):
    """A save_pretrained folder (model and tokenizer) of a small random Llama with a chat template."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=len(tok),
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def addition_jsonl(path, n: int = 30):
    """A JSONL file of {"prompt", "answer"} lines."""
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(n)))
    return path


def test_load_folder_in_bfloat16_without_touching_the_environment(tmp_path):
    folder = tiny_llm_folder(tmp_path / "tiny")
    env = dict(os.environ)
    model, tok = models.load_model(str(folder), dtype="bfloat16", device="cpu")
    assert dict(os.environ) == env  # no HF_HUB_OFFLINE or anything else left behind
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert models.resolve(str(folder)).kind == "folder"


def test_resolve_classifies_and_refuses_bad_names(tmp_path, monkeypatch):
    assert models.resolve("smollm2-135m").kind == "builtin"
    with pytest.raises(models.ModelSourceError, match="no such model folder"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(models.ModelSourceError, match="not a built-in name"):
        models.resolve("no-such-model")  # neither built-in, path nor owner/name
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelSourceError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(models.ModelSourceError, match="no such GGUF"):
        models.resolve(str(tmp_path / "m.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert models.resolve(str(tmp_path / "m.gguf")).kind == "gguf"
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(models.ModelSourceError, match="needs the 'gguf' package"):
        models.resolve(str(tmp_path / "m.gguf"))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(models.ModelSourceError, match="hub id could not be loaded"):
        models.resolve("tying-tests/no-such-model", local_files_only=True)


def test_check_device_refuses_what_this_machine_cannot_run(monkeypatch):
    models.check_device("cpu", torch.float32)
    with pytest.raises(models.PrecisionError, match="not a device; use cpu, cuda"):
        models.check_device("gpu0", torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(models.PrecisionError, match="CUDA is not available"):
            models.check_device("cuda", torch.bfloat16)

    def no_half(self, x):  # what a CPU without float16 kernels raises
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return torch.nn.functional.linear(x, self.weight, self.bias)

    monkeypatch.setattr(torch.nn.Linear, "forward", no_half)
    with pytest.raises(models.PrecisionError, match="--dtype float16 on --device cpu.*use --dtype float32 or bfloat16"):
        models.check_device("cpu", torch.float16)


def test_bfloat16_base_with_float32_factors_trains_in_float32(tmp_path):
    model, _ = models.load_model(str(tiny_llm_folder(tmp_path / "tiny")), dtype=torch.bfloat16)
    tying.apply_(model, tx.spec(model, "tl6", rank=4), dtype=torch.float32)
    factors = list(model.tying_bank.parameters())
    assert {p.dtype for p in factors} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("tying_bank")} == {torch.bfloat16}
    with torch.no_grad():
        for p in factors:
            p.normal_(0, 0.1)
    ids = torch.randint(3, 50, (2, 9))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    trained = [p for p in factors if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
                           for p in trained)
