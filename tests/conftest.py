import pytest
import torch

import tying


def _transformers():
    """transformers, or skip the calling test alone (the core tests run without the hf extra)."""
    return pytest.importorskip("transformers", reason="needs the hf extra (transformers)")


def tiny_llama(layers: int = 3, seed: int = 0):
    """A random Llama with GQA (q 32, k/v 16) and untied embeddings."""
    transformers = _transformers()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 3, seed: int = 0):
    """A random GPT-2 (fused c_attn Conv1D)."""
    transformers = _transformers()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    return TINY[request.param]()


@pytest.fixture
def keep_threads():
    """Code under test may set torch's thread count; give the rest of the session its count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread(keep_threads):
    """Tiny models run fastest (and robustly on a busy machine) on one thread."""
    torch.set_num_threads(1)


@pytest.fixture
def tokens():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snap) -> bool:
    sd = model.state_dict()
    return list(sd) == list(snap) and all(torch.equal(sd[k], snap[k]) for k in sd)


def lm_steps(model, ids, steps: int, lr: float) -> list[float]:
    """AdamW steps of a causal LM on ``ids`` (labels = inputs) over the trainable parameters; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def randomize_bank(model, seed: int = 1):
    """Give every factor (of the model's only adapter, or of the bank given) non-zero values so that merge tests
    compare a real update."""
    g = torch.Generator().manual_seed(seed)
    bank = model if isinstance(model, tying.bank.FactorBank) else tying.bank_of(model)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# Without an optional extra, a test that needs it skips alone, with the extra's name: the core suite runs on
# `pip install -e ".[dev]"` (torch, pydantic, pyyaml, safetensors, pytest, hypothesis).
EXTRAS = {"transformers": "hf", "accelerate": "hf", "gguf": "hf", "tokenizers": "hf", "timm": "timm",
          "torchvision": "timm", "gymnasium": "rl", "stable_baselines3": "rl", "peft": "bench", "trl": "bench",
          "datasets": "bench", "matplotlib": "bench", "sacrebleu": "bench", "rouge_score": "bench", "tqdm": "bench",
          "reasoning_gym": "bench", "bitsandbytes": "quant", "torchao": "quant",
          "lm_eval": "eval"}


def missing_extra(e: ImportError) -> str | None:
    """The extra whose absence raised ``e`` (a missing module, or tying's own 'pip install tying[...]' hint)."""
    if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in EXTRAS:
        return EXTRAS[e.name.split(".")[0]]
    hint = str(e).partition("tying[")[2]
    return hint.partition("]")[0] or None


def _skip_without_extras():
    try:
        return (yield)
    except ImportError as e:
        extra = missing_extra(e)
        if extra is None:
            raise
        pytest.skip(f"needs the {extra} extra ({e})")


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_without_extras()))
pytest_runtest_call = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_without_extras()))
