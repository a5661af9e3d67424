"""Parameter counts: every preset on the paper's two models matches PAPER.md's formulas exactly."""

import json

import pytest
from tying.integrations.meta_models import meta_model

import tying
from tying.cli import main

PAPER = {"llama2-7b": (32, 4096), "gpt-2b-001": (24, 2048)}

# (trainable, frozen) as functions of L, d, r; from PAPER.md's table of configurations.
FORMULAS = {
    "lora": lambda L, d, r: (4 * L * d * r, 0),
    "tl6": lambda L, d, r: (4 * d * r + L * (r + 3 * d), 0),
    "tied-ABuv": lambda L, d, r: (4 * d * r + L * (r + 3 * d), 0),
    "tl5": lambda L, d, r: (4 * d * r, 0),
    "tied-AB": lambda L, d, r: (4 * d * r, 0),
    "vera": lambda L, d, r: (L * (r + 3 * d), 4 * d * r),
    "tied-uv": lambda L, d, r: (L * (r + 3 * d), 4 * d * r),
    "tied-Auv": lambda L, d, r: (d * r + L * (r + 3 * d), 3 * d * r),
    "tied-Buv": lambda L, d, r: (3 * d * r + L * (r + 3 * d), d * r),
    "tied-ABu": lambda L, d, r: (4 * d * r + L * r, 0),
    "tied-ABv": lambda L, d, r: (4 * d * r + 3 * L * d, 0),
    "tied-v": lambda L, d, r: (3 * L * d, 4 * d * r),
    # sharing schemes from the literature
    "sharelora-A": lambda L, d, r: (d * r + 3 * L * d * r, 0),
    "sharelora-B": lambda L, d, r: (L * d * r + 3 * d * r, 0),
    "lora-group4": lambda L, d, r: (-(-L // 4) * 4 * d * r, 0),
    "lotr": lambda L, d, r: (4 * d * r + L * r * r, 0),
    # other kinds (PAPER.md's models have d_kv = d): IA3 output vectors, bottlenecks on q/k/v, prefixes
    "ia3": lambda L, d, r: (3 * L * d, 0),
    "ia3-tied": lambda L, d, r: (3 * d, 0),
    "bottleneck": lambda L, d, r: (3 * L * 2 * d * r, 0),
    "bottleneck-tied": lambda L, d, r: (3 * 2 * d * r, 0),
    "prefix": lambda L, d, r: (2 * L * r * d, 0),
    "prefix-tied": lambda L, d, r: (2 * r * d, 0),
    "dora": lambda L, d, r: (4 * L * d * r + 3 * L * d, 0),  # lora + a magnitude per output row of q, k, v
    "tied-dora": lambda L, d, r: (4 * d * r + L * (r + 3 * d) + 3 * L * d, 0),  # tl6 + the magnitudes
}


def test_every_preset_has_a_formula():
    from tying.presets.families import FAMILIES  # their counts: FAMILY_FORMULAS below, and PEFT's (test_pools)

    assert set(tying.preset_names()) == set(FORMULAS) | set(FAMILIES) == set(FORMULAS) | set(FAMILY_FORMULAS)


# the pool family at its default knobs on LLaMA-2 7B (separate q, k, v of width d); (trainable, frozen)
FAMILY_FORMULAS = {
    "lily": lambda L, d, r: (3 * L * r * d + 3 * 2 * d * r + 3 * L * 2 * r, 0),  # A per layer and projection, a
    # pool of 2 B's per projection, a router (2 x r) per module
    "vb-lora": lambda L, d, r: (256 * 64 + 3 * L * 2 * r * (d // 64) * 256, 0),  # the bank, logits of A's and B's
    "mos": lambda L, d, r: (2 * 64 * d, 3 * L * 2 * r * 64),  # two pools of 64 shards; frozen selection logits
    "hydralora": lambda L, d, r: (3 * L * (r * d + 3 * d * r + 3 * d), 0),  # A, 3 B heads, a router on x
    "mtl-lora": lambda L, d, r: (3 * L * (r * d + 2 * r + 2 * d * r + 2 * 2), 0),  # 2 tasks: A, a u per task, 2
    # heads shared, mixing weights per task
}


@pytest.mark.parametrize("preset", sorted(FAMILY_FORMULAS))
@pytest.mark.parametrize("rank", [4, 8])
def test_family_formulas(paper_models, preset, rank):
    L, d = PAPER["llama2-7b"]
    c = tying.count(paper_models["llama2-7b"], preset, rank=rank, **({"tasks": ["a", "b"]} if preset == "mtl-lora"
                                                                      else {}))
    assert (c.trainable, c.frozen) == FAMILY_FORMULAS[preset](L, d, rank)


@pytest.fixture(scope="module")
def paper_models():
    return {name: meta_model(name) for name in PAPER}


@pytest.mark.parametrize("model_name", sorted(PAPER))
@pytest.mark.parametrize("preset", sorted(FORMULAS))
@pytest.mark.parametrize("rank", [2, 8, 32, 128])
def test_paper_formulas(paper_models, model_name, preset, rank):
    L, d = PAPER[model_name]
    c = tying.count(paper_models[model_name], preset, rank=rank)
    assert (c.trainable, c.frozen) == FORMULAS[preset](L, d, rank)


def test_paper_table_rank8_llama(paper_models):
    m = paper_models["llama2-7b"]
    lora, tl6 = tying.count(m, "lora", rank=8).trainable, tying.count(m, "tl6", rank=8).trainable
    assert (lora, tl6) == (4_194_304, 524_544)
    assert round(100 * tl6 / lora, 1) == 12.5
    assert tying.count(m, "tl5", rank=8).trainable == 131_072  # 96.875 % fewer than LoRA


def test_count_allocates_nothing(paper_models):
    m = paper_models["llama2-7b"]
    tying.count(m, "tl6")
    assert all(p.device.type == "meta" for p in m.parameters())
    assert not hasattr(m, "tying_bank")


@pytest.mark.parametrize("spec,expected", [("lora", 4_194_304), ("tl6", 524_544)])
def test_cli_count_json(capsys, spec, expected):
    pytest.importorskip("transformers")  # the named models are transformers configs
    assert main(["count", "--model", "llama2-7b", "--spec", spec, "--rank", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable"] == expected and out["frozen"] == 0
    assert sum(f["trainable"] for f in out["by_factor"].values()) == expected


def test_cli_budget(capsys):
    pytest.importorskip("transformers")  # the named models are transformers configs
    assert main(["budget", "--model", "llama2-7b", "--max-params", "600000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == sorted(rows, key=lambda r: r["trainable"]) and all(r["trainable"] <= 600_000 for r in rows)
    assert {"preset": "tied-ABuv = tl6", "rank": 8, "trainable": 524_544} in [{k: r[k] for k in ("preset", "rank", "trainable")}
                                                                 for r in rows]
    # lora costs 4 * 32 * 4096 * r: rank 1 (524,288) fits, rank 2 (1,048,576) does not
    assert {r["rank"]: r["trainable"] for r in rows if r["preset"] == "lora"} == {1: 524_288}
    assert main(["budget", "--model", "smollm2-135m", "--max-params", "100000", "--targets", "all_linear"]) == 0
    assert "preset" in capsys.readouterr().out


def test_cli_inspect_and_errors(capsys, tmp_path):
    pytest.importorskip("transformers")  # the named models are transformers configs
    assert main(["inspect", "--model", "gpt-2b-001", "--spec", "vera", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.23.self_attn.v_proj" in out and "frozen" in out and "trained" in out
    assert "A      model:layers:*:self_attn:*" in out
    assert main(["count", "--model", "no-such-model", "--spec", "tl6"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4}))
    assert main(["count", "--model", str(cfg), "--spec", "lora", "--rank", "4", "--json"]) == 0
    # GPT-2 fused c_attn: A (r x d) + B (3d x r) per layer
    assert json.loads(capsys.readouterr().out)["trainable"] == 2 * (4 * 64 + 3 * 64 * 4)
