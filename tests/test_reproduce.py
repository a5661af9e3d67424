"""benchmarks/reproduce.py's bookkeeping: which finished parts are reused and reported (no model runs)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).parents[1] / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)


def _row(config, score, lr=None, rank=8, trainable=1000, **settings):
    s = {**reproduce.QUICK, "seed": 0, **settings}
    row = {k: s[k] for k in (*reproduce.SETTINGS, "seed")}
    row.update(task="nli", config=config, rank=0 if config == "zero-shot" else rank, score=score,
               trainable=0 if config == "zero-shot" else trainable, seconds=1.0, metrics={"accuracy": score})
    if config != "zero-shot":
        row["lr"] = reproduce.LR[config] if lr is None else lr
    return row


def test_is_current_checks_settings_seed_and_lr():
    s = {**reproduce.QUICK, "seed": 0}
    assert reproduce.is_current(_row("lora", 30.0), s)
    assert not reproduce.is_current(_row("lora", 30.0, lr=1e-5), s)  # trained at another LR
    assert not reproduce.is_current(_row("lora", 30.0, steps=999), s)
    assert not reproduce.is_current(_row("lora", 30.0, seed=1), s)
    # zero-shot does not train: only its test set (and seed) matter
    assert reproduce.is_current(_row("zero-shot", 1.0, steps=999, batch=1), s)
    assert not reproduce.is_current(_row("zero-shot", 1.0, n_test=7), s)


def test_resume_reuses_parts_and_reports_every_current_part(tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    parts.mkdir()
    rows = [_row("tl6", 38.0, trainable=100), _row("zero-shot", 1.0), _row("lora", 31.0),
            _row("ia3", 33.0, trainable=10),  # not asked for in this run, but finished at these settings
            _row("vera", 99.0, lr=1e-5)]  # a stale LR: neither reused nor reported
    for r in rows:
        (parts / f"{reproduce.part_name(r)}.json").write_text(json.dumps(r))

    def fake_run_part(part, out, lr=None, val=False):
        assert part["config"] == "vera", "only the stale part is rerun"
        return _row("vera", 2.0, trainable=50)

    monkeypatch.setattr(reproduce, "run_part", fake_run_part)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--quick", "--resume", "--out", str(tmp_path)])
    reproduce.main()
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert [(r["config"], r["score"]) for r in report["rows"]] == [
        ("zero-shot", 1.0), ("lora", 31.0), ("vera", 2.0), ("tl6", 38.0), ("ia3", 33.0)]
    md = (tmp_path / "reproduce.md").read_text()
    assert "| nli | accuracy | tl6 | 8 | 38.00 | 100 | 10.0 |" in md  # percent of LoRA's 1,000


def test_sweeps_side_by_side_keep_each_others_results(tmp_path, monkeypatch):
    s = {**reproduce.QUICK, "seed": 0, "configs": ["tl6"]}
    f = tmp_path / "lr_sweep.json"
    f.write_text(json.dumps({"settings": s, "results": [{"task": "nli", "config": "lora", "lr": 0.01, "score": 30.0}]}))

    def fake_run_part(part, out, lr=None, val=False):
        assert val, "the sweep scores held-out training examples"
        # another sweep finishes a point while this one trains
        other = json.loads(f.read_text())
        other["results"].append({"task": "nli", "config": "vera", "lr": lr, "score": 5.0})
        f.write_text(json.dumps(other))
        return {"score": 40.0 + 1000 * lr}

    monkeypatch.setattr(reproduce, "run_part", fake_run_part)
    reproduce.sweep(s, tmp_path, grid=(1e-3, 1e-2))
    got = {(r["config"], r["lr"]): r["score"] for r in json.loads(f.read_text())["results"]}
    assert got == {("lora", 0.01): 30.0, ("vera", 0.001): 5.0, ("vera", 0.01): 5.0,
                   ("tl6", 0.001): 41.0, ("tl6", 0.01): 50.0}
    assert "| nli (accuracy) | tl6 | 41.0 | 50.0 | 0.01 |" in (tmp_path / "lr_sweep.md").read_text()


def test_adapt_seeds_presets_without_their_own_seed():
    from conftest import tiny_llama

    def bank(seed, rng_state):  # LoRA's A has no seed in the preset: it draws from the global RNG
        model = tiny_llama()
        torch.manual_seed(rng_state)  # whatever state the process was in (it differs between processes)
        reproduce.adapt(model, "lora", 4, seed)
        return {k: v.clone() for k, v in model.tying_bank.state_dict().items()}

    a, b, c = bank(0, rng_state=1), bank(0, rng_state=2), bank(1, rng_state=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
