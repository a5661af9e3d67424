"""benchmarks/vision.py's bookkeeping on fake images: each method's row is kept as it finishes, a rerun
reuses it, ``--methods`` splits the work, and the report holds every finished method."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
_spec = importlib.util.spec_from_file_location("vision_bench", Path(__file__).parents[1] / "benchmarks" / "vision.py")
vision = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vision)
pytestmark = pytest.mark.usefixtures("keep_threads")


def test_methods_resume_and_split(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    fake = {k: (torch.randn(60, 1, 28, 28, generator=g), torch.arange(60) % 10) for k in ("train", "valid", "test")}
    monkeypatch.setattr(vision, "RESULTS", tmp_path)
    monkeypatch.setattr(vision, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(vision, "load_mnist", lambda: fake)
    monkeypatch.setattr(vision, "PRETRAIN", {**vision.PRETRAIN, "epochs": 1})
    monkeypatch.setitem(vision.MODES, "tiny", {"n_train": 20, "epochs": 1, "n_sweep": 10, "n_val": 10,
                                               "seeds": [0, 1], "batch": 10})
    monkeypatch.setattr(vision, "METHODS", {k: vision.METHODS[k] for k in ("probe", "lora", "tl6")})
    first = vision.run("tiny", methods=["probe", "tl6"])
    assert list(first["methods"]) == ["probe", "tl6"]
    assert len(first["methods"]["tl6"]["test_accuracy"]) == 2  # two seeds
    kept = (tmp_path / "vision-tiny" / "tl6.json").read_text()
    calls = []
    real = vision.train
    monkeypatch.setattr(vision, "train", lambda model, *a, **k: calls.append(a[-1]) or real(model, *a, **k))
    second = vision.run("tiny")  # only lora is left to run
    assert list(second["methods"]) == ["probe", "lora", "tl6"]
    assert calls and all(c.startswith("lora") for c in calls), calls
    assert (tmp_path / "vision-tiny" / "tl6.json").read_text() == kept
    assert second["methods"]["tl6"] == json.loads(kept)
    monkeypatch.setitem(vision.MODES, "tiny", {**vision.MODES["tiny"], "epochs": 2})  # other settings: rerun
    calls.clear()
    vision.run("tiny", methods=["tl6"])
    assert calls and all(c.startswith("tl6") for c in calls)
    assert "| tl6 |" in vision.write(second)
    rates = [{float(k): v for k, v in r["sweep_val_accuracy"].items()} for r in second["methods"].values()]
    assert all(vision.beyond(r) is None for r in rates)  # every pick is inside its (extended) grid, or at 1e-5 / 1
    assert len(second["methods"]["tl6"]["hits"]) == 2 and len(second["methods"]["tl6"]["hits"][0]) == 30  # digits 5-9 of 60
    assert "hits" not in json.loads((tmp_path / "vision-tiny.json").read_text())["methods"]["tl6"]  # kept in the parts
    assert sorted(f.name for f in tmp_path.glob("*.*")) == ["vision-tiny.json", "vision-tiny.md", "vision-tiny.png"]
    # a finished part whose pick sits at its grid's top edge: a rerun sweeps only the rates beyond it, then retrains
    f = tmp_path / "vision-tiny" / "tl6.json"
    part = json.loads(f.read_text())
    f.write_text(json.dumps({**part, "sweep_val_accuracy": {"0.01": 0.1, "0.03": 0.2, "0.1": 0.9}}))
    calls.clear()
    vision.run("tiny", methods=["tl6"])
    swept = [c for c in calls if "sweep" in c]
    assert swept and swept[0] == "tl6 sweep lr=0.3" and not any(c.endswith(("=0.01", "=0.03", "=0.1")) for c in swept)
    assert "0.3" in json.loads(f.read_text())["sweep_val_accuracy"]


def test_versus_lora_by_hand():
    """LoRA gets both test images right (one seed). 'half' misses image 2: per-image differences 0 and -100, so
    a resample of two images averages 0, -50 or -100 and the 95 % interval is [-100, 0]: undecided both ways.
    'none' misses both: -100 with no width, refuted. 'same' equals LoRA: 0 [0, 0] is not above 0 (undecided) but
    lies above the -10 bound of "comparable" (supported). A method without per-image hits is left out."""
    methods = {"lora": {"hits": ["11"], "mean": 1.0}, "half": {"hits": ["10"]}, "none": {"hits": ["00"]},
               "same": {"hits": ["11"]}, "old": {"mean": 0.5}}
    rows = [line for line in vision.versus_lora(methods) if line.startswith("| ") and "−" not in line]
    assert rows == ["| half | -50.00 [-100.00, +0.00] | undecided at this scale | undecided at this scale |",
                    "| none | -100.00 [-100.00, -100.00] | refuted | refuted |",
                    "| same | +0.00 [+0.00, +0.00] | undecided at this scale | supported |"]
    assert vision.versus_lora({"probe": {"hits": ["1"]}}) == []  # no LoRA row, no pair: nothing to compare
    assert "| tl6 | tl5 | +100.00 [+100.00, +100.00] | supported |" in vision.versus_lora(
        {"tl6": {"hits": ["1"]}, "tl5": {"hits": ["0"]}})  # the direct pairs need no LoRA row
    # the direct pairs: TL6 right on both images, TL5 on none, the VeRA-like setting scored on another seed count
    pairs = {"lora": {"hits": ["10"], "mean": 0.5}, "tl6": {"hits": ["11"]}, "tl5": {"hits": ["00"]},
             "vera": {"hits": ["11", "11"]}}
    lines = vision.versus_lora(pairs)
    assert "| tl6 | tl5 | +100.00 [+100.00, +100.00] | supported |" in lines
    assert not any(line.startswith("| tl6 | vera |") for line in lines)


def test_rate_pick_and_grid_extension_by_hand():
    """The smallest rate within one point of the best; a pick at the grid's edge asks for the next 3x rate
    beyond it (up at the top, down at the bottom), never above 1."""
    inside = {0.01: 0.80, 0.03: 0.85, 0.1: 0.845}
    assert vision.pick(inside) == 0.03 and vision.beyond(inside) is None
    top = {0.03: 0.78, 0.1: 0.82, 0.3: 0.85}
    assert vision.pick(top) == 0.3 and vision.beyond(top) == 1.0
    assert vision.beyond({0.3: 0.80, 1.0: 0.85}) is None  # 3.0 is past the ladder's end
    bottom = {0.003: 0.85, 0.01: 0.85, 0.03: 0.80}
    assert vision.pick(bottom) == 0.003 and vision.beyond(bottom) == 0.001
