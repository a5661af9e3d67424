"""benchmarks/vision_tasks.py (joint against separate ViT adapters across two splits) on fake images: each seed is
kept as it finishes and reused, the joint adapter has one copy of A and B and u, v per split, and the report holds
the paired intervals and verdicts."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import vision
import vision_tasks

pytestmark = pytest.mark.usefixtures("keep_threads")


def test_vision_tasks_joint_and_separate_resume(tmp_path, monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    fake = {k: (torch.randn(80, 1, 28, 28, generator=g), torch.arange(80) % 10) for k in ("train", "valid", "test")}
    monkeypatch.setattr(vision, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(vision, "load_mnist", lambda: fake)
    monkeypatch.setattr(vision, "PRETRAIN", {**vision.PRETRAIN, "epochs": 1})
    out = tmp_path / "out"
    vision_tasks.main(["--seeds", "0", "1", "--n-train", "20", "--epochs", "1", "--out", str(out)])
    result = json.loads((out / "vision_tasks.json").read_text())
    assert sorted(result["seeds"]) == ["0", "1"]
    row = result["seeds"]["0"]
    # TL6 rank 8 on 6 fused qkv (64 -> 192): A, B once; u (8) per block and split; v (192) per block and split
    assert row["joint"]["per_task"] == 6 * (8 + 192)
    assert row["joint"]["trainable"] == 8 * 64 + 192 * 8 + 2 * 6 * (8 + 192) + 325
    md = (out / "vision_tasks.md").read_text()
    assert md.count("| upright |") == 1 and md.count("| rotated |") == 1 and "[95 % CI]" in md
    rotated = md.split("| rotated |")[1].split("\n")[0]
    assert any(w in rotated for w in ("supported", "refuted", "undecided")), rotated
    assert len(row["joint"]["rotated"]["hits"]) == len(row["separate"]["rotated"]["hits"]) > 0  # per image, paired
    capsys.readouterr()
    calls = []
    monkeypatch.setattr(vision_tasks, "run_seed", lambda *a, **k: calls.append(a) or {})
    vision_tasks.main(["--seeds", "0", "1", "--n-train", "20", "--epochs", "1", "--out", str(out)])
    assert not calls  # both seeds were kept


def test_rl_tasks_joint_and_separate_resume(tmp_path, monkeypatch, capsys):
    """benchmarks/rl_tasks.py on a briefly pretrained policy: one joint adapter across two pole lengths against one
    per length; a finished seed is kept, and the report pairs (seed, environment) returns."""
    pytest.importorskip("stable_baselines3")
    import rl
    import rl_tasks
    monkeypatch.setattr(rl, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(rl, "PRETRAIN", {**rl.PRETRAIN, "steps": 256})
    monkeypatch.setattr(rl_tasks, "CHUNK", 64)
    real = rl.evaluate
    monkeypatch.setattr(rl, "evaluate", lambda model, env, n, **k: real(model, env, 2, **k))
    out = tmp_path / "out"
    args = ["--lengths", "1.5", "3", "--steps", "128", "--seeds", "0", "1", "--out", str(out)]
    rl_tasks.main(args)
    result = json.loads((out / "rl_tasks.json").read_text())
    assert sorted(result["seeds"]) == ["0", "1"]
    joint, separate = result["seeds"]["0"]["joint"], result["seeds"]["0"]["separate"]
    assert set(separate) == set(joint) - {"trainable", "per_task"} and len(separate) == 2
    # shared A, B and heads once; u, v per environment: two environments cost less than two separate adapters
    assert 0 < joint["per_task"] < joint["trainable"] < sum(s["trainable"] for s in separate.values())
    md = (out / "rl_tasks.md").read_text()
    assert "over 4 (seed, environment) pairs" in md and "bootstrap interval" in md
    calls = []
    monkeypatch.setattr(rl_tasks, "separate", lambda *a, **k: calls.append(a) or {})
    rl_tasks.main(args)
    assert not calls  # both seeds were kept


@pytest.mark.slow
def test_serving_tasks_quick(tmp_path):
    """benchmarks/serving_tasks.py --quick: resident bytes grow by about one task's u and v per task, and the
    mixed-batch ratios are measured for 16 tasks and PEFT's 16 LoRAs."""
    pytest.importorskip("peft")
    import serving_tasks
    serving_tasks.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "quick" / "serving_tasks.json").read_text())
    assert result["u_v_bytes_per_task"] <= result["bytes_per_extra_task"] < 1.1 * result["u_v_bytes_per_task"]
    for job in ("forward", "generate"):
        assert set(result["speed"][job]["vs_one_task"]) == {"tasks-16", "peft-16"}
