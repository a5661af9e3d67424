import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 3, seed: int = 0):
    """A random Llama with GQA (q 32, k/v 16) and untied embeddings."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 3, seed: int = 0):
    """A random GPT-2 (fused c_attn Conv1D)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    return TINY[request.param]()


@pytest.fixture
def tokens():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snap) -> bool:
    sd = model.state_dict()
    return list(sd) == list(snap) and all(torch.equal(sd[k], snap[k]) for k in sd)


def randomize_bank(model, seed: int = 1):
    """Give every factor non-zero values so that merge tests compare a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tying_bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
