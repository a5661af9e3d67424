"""benchmarks/reproduce.py: bookkeeping (which finished parts are reused and reported), the paper's grid file,
bad input refused before anything is written, and whole runs on a tiny local model (any model, dtype, GPU preset)."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import tying

pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).parents[1] / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)


def _row(config, score, lr=None, rank=8, trainable=1000, **settings):
    s = {**reproduce.RUN, **reproduce.QUICK, "seed": 0, **settings}
    row = {k: s[k] for k in (*reproduce.SETTINGS, *reproduce.RUN, "seed")}
    row.update(task="nli", config=config, rank=0 if config == "zero-shot" else rank, score=score,
               trainable=0 if config == "zero-shot" else trainable, seconds=1.0, metrics={"accuracy": score})
    if config != "zero-shot":
        row["lr"] = reproduce.LR[config] if lr is None else lr
    return row


def test_is_current_checks_settings_seed_and_lr():
    s = {**reproduce.RUN, **reproduce.QUICK, "seed": 0}
    assert reproduce.is_current(_row("lora", 30.0), s)
    assert not reproduce.is_current(_row("lora", 30.0, lr=1e-5), s)  # trained at another LR
    assert not reproduce.is_current(_row("lora", 30.0, steps=999), s)
    assert not reproduce.is_current(_row("lora", 30.0, seed=1), s)
    # zero-shot does not train: only its test set (and seed) matter
    assert reproduce.is_current(_row("zero-shot", 1.0, steps=999, batch=1), s)
    assert not reproduce.is_current(_row("zero-shot", 1.0, n_test=7), s)
    # model, dtype and data: another one is never reused; rows from before these keys count as the defaults
    assert not reproduce.is_current(_row("lora", 30.0, dtype="bfloat16"), s)
    assert not reproduce.is_current(_row("zero-shot", 1.0, model="/ckpt/llama"), s)
    old = {k: v for k, v in _row("lora", 30.0).items() if k not in reproduce.RUN}
    assert reproduce.is_current({**old, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"}, s)
    # rates from a sweep (--lr-from): a cell its table does not name is not this run's, even at a matching rate
    swept = {**s, "lr_from": "lr_sweep.json", "lr_of": {"nli/tl6/r8": 0.05}}
    assert reproduce.is_current(_row("tl6", 30.0, lr=0.05), swept)
    assert not reproduce.is_current(_row("lora", 30.0), swept)


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
    assert "| nli | accuracy | tl6 | 8 | 0 | 38.00 | 100 | 10.0 |" in md  # seed 0; percent of LoRA's 1,000


def test_sweeps_side_by_side_keep_each_others_results(tmp_path, monkeypatch):
    s = {**reproduce.RUN, **reproduce.QUICK, "seed": 0, "configs": ["tl6"]}
    f = tmp_path / "lr_sweep.json"
    f.write_text(json.dumps({"settings": s, "results": [{"task": "nli", "config": "lora", "lr": 0.01, "score": 30.0}]}))

    def fake_run_part(part, out, lr=None, val=False):
        assert val, "the sweep scores held-out training examples"
        # another sweep finishes a point while this one trains
        other = json.loads(f.read_text())
        other["results"].append({"task": "nli", "config": "vera", "lr": lr, "score": 5.0})
        f.write_text(json.dumps(other))
        return {"score": 40.0 + 1000 * lr, "seconds": 2.0, "eval_seconds": 1.0, "loss_last": 0.5}

    monkeypatch.setattr(reproduce, "run_part", fake_run_part)
    reproduce.sweep(s, tmp_path, grid=(1e-3, 1e-2))
    got = {(r["config"], r["lr"]): r["score"] for r in json.loads(f.read_text())["results"]}
    assert got == {("lora", 0.01): 30.0, ("vera", 0.001): 5.0, ("vera", 0.01): 5.0,
                   ("tl6", 0.001): 41.0, ("tl6", 0.01): 50.0}
    assert "| nli (accuracy) | tl6 | 8 | 41.0 | 50.0 | 0.01 (edge: extend) |" in (tmp_path / "lr_sweep.md").read_text()


def test_the_lr_rule_and_the_grid_extension(tmp_path, monkeypatch):
    assert reproduce.best_lr({1e-3: 40.0, 3e-3: 47.0, 1e-2: 47.0, 3e-2: 0.0}) == 3e-3  # a tie: the smaller rate
    assert not reproduce.at_edge({1e-3: 40.0, 3e-3: 47.0, 1e-2: 47.0})
    assert reproduce.at_edge({1e-3: 40.0, 3e-3: 41.0}) and reproduce.at_edge({1e-3: 42.0, 3e-3: 41.0})
    assert [reproduce.next_rate(lr, up=True) for lr in (1e-3, 3e-3, 1e-2, 3e-2)] == [3e-3, 1e-2, 3e-2, 1e-1]
    assert [reproduce.next_rate(lr, up=False) for lr in (1e-3, 3e-3, 1e-1)] == [3e-4, 1e-3, 3e-2]
    # --extend: a cell peaking at the top edge gets 3e-2, then 1e-1 (which scores worse), and stops there
    s = {**reproduce.RUN, **reproduce.QUICK, "seed": 0, "configs": ["tl6"]}
    peak = {1e-3: 30.0, 3e-3: 35.0, 1e-2: 40.0, 3e-2: 45.0, 1e-1: 10.0}
    ran = []
    monkeypatch.setattr(reproduce, "run_part", lambda part, out, lr=None, val=False: ran.append(lr) or
                        {"score": peak[lr], "seconds": 1.0, "eval_seconds": 0.0, "loss_last": 1.0})
    reproduce.sweep(s, tmp_path, grid=(1e-3, 3e-3, 1e-2), extend=True)
    assert ran == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    reproduce.sweep(s, tmp_path, grid=(1e-3, 3e-3, 1e-2), extend=True)
    assert len(ran) == 5, "finished cells are not rerun"
    # --lr-from: the rule's pick per (task, config, rank); a cell missing or at its edge is refused by name
    assert reproduce.lr_table(str(tmp_path / "lr_sweep.json"), s) == {"nli/tl6/r8": 3e-2}
    with pytest.raises(ValueError, match=r"nli/lora/r8 \(not swept\)"):
        reproduce.lr_table(str(tmp_path / "lr_sweep.json"), {**s, "configs": ["tl6", "lora"]})
    assert reproduce.lr_table(str(tmp_path / "lr_sweep.json"), {**s, "configs": ["tl6", "lora"]}, strict=False) == {
        "nli/tl6/r8": 3e-2}  # --report: the cells there are
    s2 = {**s, "lr_of": {"nli/tl6/r8": 3e-2, "tl6": 1e-3}}
    assert reproduce.lr_for(s2, "nli", "tl6", 8) == 3e-2 and reproduce.lr_for(s2, "squad", "tl6", 8) == 1e-3
    assert reproduce.lr_for(s, "nli", "tl6", 8) == reproduce.LR["tl6"]


def test_a_cell_without_signal_stops_extending_and_is_refused(tmp_path, monkeypatch):
    assert reproduce.no_signal({3e-3: 0.0, 1e-2: 0.0}) and not reproduce.no_signal({3e-3: 0.0})
    assert not reproduce.no_signal({3e-3: 0.0, 1e-2: 1.0})
    s = {**reproduce.RUN, **reproduce.QUICK, "seed": 0, "configs": ["tl6"]}
    ran = []
    monkeypatch.setattr(reproduce, "run_part", lambda part, out, lr=None, val=False: ran.append(lr) or
                        {"score": 0.0, "seconds": 1.0, "eval_seconds": 0.0, "loss_last": 1.0})
    reproduce.sweep(s, tmp_path, grid=(3e-3, 1e-2, 3e-2), extend=True)
    assert ran == [3e-3, 1e-2, 3e-2], "a floor cell does not walk the rate ladder down to 1e-5"
    assert "| none (no signal) |" in (tmp_path / "lr_sweep.md").read_text()
    with pytest.raises(ValueError, match=r"nli/tl6/r8 \(no signal: every rate scored the same\)"):
        reproduce.lr_table(str(tmp_path / "lr_sweep.json"), s)


def test_seeds_and_per_task_test_sizes_add_up_to_one_report(tmp_path, monkeypatch):
    def fake_run_part(part, out, lr=None, val=False):
        per = [100.0] * (part["seed"] + 1) + [0.0] * (part["n_test"] - part["seed"] - 1)
        return {**part, "lr": lr, "trainable": 10, "seconds": 3600.0, "eval_seconds": 0.0, "score": sum(per) / len(per),
                "metrics": {"accuracy": 0.0, "per_example": per}, "loss": [4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]}

    monkeypatch.setattr(reproduce, "run_part", fake_run_part)
    args = ["--tasks", "nli", "translation", "--configs", "lora", "--steps", "8", "--n-train", "8", "--batch", "2",
            "--lr", "0.01", "--out", str(tmp_path)]
    reproduce.main([*args, "--n-test", "4", "--report"])  # nothing finished yet: an empty report, no error
    assert "| task | metric | config |" in (tmp_path / "reproduce.md").read_text()
    reproduce.main([*args, "--n-test", "4", "nli=5", "--seed", "0", "1"])
    rows = json.loads((tmp_path / "reproduce.json").read_text())["rows"]
    assert [(r["task"], r["config"], r["seed"], r["n_test"]) for r in rows] == [
        ("nli", "zero-shot", 0, 5), ("nli", "lora", 0, 5), ("nli", "lora", 1, 5),  # zero-shot: first seed only
        ("translation", "zero-shot", 0, 4),
        ("translation", "lora", 0, 4), ("translation", "lora", 1, 4)]
    md = (tmp_path / "reproduce.md").read_text()
    assert "| nli | lora | 8 | 2 | 30.0 ± 14.1 |" in md  # seed means 20 and 40 (1 and 2 of 5 right)
    # loss: first 10 % of 8 steps = step 1 (4.0), last quarter 1.0, third quarter 1.0: nothing left to fall
    assert "| nli | lora | 8 | 8 | 4.000 | 1.000 | 0% |" in md
    assert "| nli | lora | 0.00 | 2.00 |" in md  # two one-hour parts
    assert (tmp_path / "reproduce-loss.png").exists()
    monkeypatch.setattr(reproduce, "run_part", lambda *a, **k: pytest.fail("--report trains nothing"))
    reproduce.main([*args, "--n-test", "4", "nli=5", "--seed", "0", "--report"])  # a subset of the seeds
    assert [r["seed"] for r in json.loads((tmp_path / "reproduce.json").read_text())["rows"]] == [0] * 4


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


# ---------------------------------------------------------------- the paper's grid, whole runs, bad input
PAPER = Path(__file__).parents[1] / "benchmarks" / "configs" / "paper.yaml"


def test_plan_prints_the_papers_grid_with_exact_counts(capsys):
    reproduce.main(["--plan", str(PAPER), "--json"])
    rows = json.loads(capsys.readouterr().out)
    at = {(r["model"], r["config"], r["rank"]): r["trainable"] for r in rows if r["task"] == "squad"}
    assert at["llama2-7b", "lora", 8] == 4_194_304 and at["llama2-7b", "tl6", 8] == 524_544  # PAPER.md
    assert at["gpt-2b-001", "lora", 128] == 25_165_824 and at["gpt-2b-001", "tl6", 2] == 163_888
    assert {r["rank"] for r in rows} == {2, 8, 16, 32, 64, 128} and {"tl5", "vera", "tied-v"} <= {r["config"] for r in rows}
    assert all(set(r) >= {"model", "task", "config", "rank", "seed", "trainable", "tokens", "gpu_hours"} for r in rows)
    assert len({r["task"] for r in rows}) == 5 and all(r["gpu_hours"] > 0 for r in rows)
    assert "| llama2-7b | tl6 | 8 | 524,544 |" in reproduce.G.table(rows, reproduce.G.load_grid(PAPER))  # without --json


pytestmark = pytest.mark.usefixtures("keep_threads")  # the CLI sets one thread; the session gets its count back


def run_cli(args, out):
    """reproduce.main with --threads 1 and a 1-test-example-per-part budget; returns reproduce.json's rows."""
    reproduce.main([*args, "--threads", "1", "--device", "cpu", "--out", str(out)])
    return json.loads((out / "reproduce.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_llm_models import addition_jsonl, tiny_llm_folder
    root = tmp_path_factory.mktemp("tiny")
    return tiny_llm_folder(root / "model"), addition_jsonl(root / "add.jsonl")


def test_any_model_folder_in_bfloat16(tiny_run, tmp_path):
    """The issue's contract: a save_pretrained Llama folder, a JSONL task, TL6 in bfloat16."""
    folder, jsonl = tiny_run
    report = run_cli(["--model", str(folder), "--tasks", str(jsonl), "--configs", "tl6", "--steps", "3",
                      "--n-train", "16", "--n-test", "8", "--batch", "2", "--dtype", "bfloat16"], tmp_path)
    (tl6,) = [r for r in report["rows"] if r["config"] == "tl6"]
    # rank 8, d 32, q 32 / k 16 / v 16, 2 layers: A and B tied once, u and v per layer
    assert tl6["trainable"] == 8 * 32 + (32 + 16 + 16) * 8 + 2 * (8 + 32 + 16 + 16)
    assert 0 <= tl6["score"] <= 100 and tl6["dtype"] == "bfloat16" and tl6["tokens"] > 0
    assert (tmp_path / "adapters" / "add.jsonl-tl6-r8-s0" / "adapter.safetensors").exists()


def test_gpu_preset_and_grid_file_run_end_to_end_on_the_cpu(tiny_run, tmp_path):
    """--gpu is the same code path as every run: here tiny, on the CPU; a grid file runs and resumes by parts."""
    folder, jsonl = tiny_run
    report = run_cli(["--gpu", "--model", str(folder), "--tasks", str(jsonl), "--steps", "2", "--n-train", "8",
                      "--n-test", "4", "--batch", "2"], tmp_path / "gpu")
    assert report["settings"]["dtype"] == "bfloat16" and report["settings"]["gen_batch"] == 64
    assert [r["config"] for r in report["rows"]] == ["zero-shot", "lora", "vera", "tl5", "tl6"]
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"models: {{tiny: {{shape: {folder / 'config.json'}, checkpoint: {folder}}}}}\n"
                    f"tasks: [{jsonl}]\nconfigs: [tl5]\nranks: [2]\n"
                    "training: {steps: 2, batch: 2, n_train: 8, n_test: 4, dtype: float32}\n")
    reproduce.main(["--grid", str(grid), "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "g")])
    rows = json.loads((tmp_path / "g" / "tiny" / "reproduce.json").read_text())["rows"]
    assert [(r["config"], r["rank"]) for r in rows] == [("zero-shot", 0), ("tl5", 2)]
    mtime = (tmp_path / "g" / "tiny" / "parts" / "add.jsonl-tl5-r2-s0.json").stat().st_mtime_ns
    reproduce.main(["--grid", str(grid), "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "g")])
    assert (tmp_path / "g" / "tiny" / "parts" / "add.jsonl-tl5-r2-s0.json").stat().st_mtime_ns == mtime  # resumed


def refused(args, out, match, capsys=None):
    with pytest.raises(SystemExit) as e:
        reproduce.main([*args, "--device", "cpu", "--out", str(out)])
    assert re.search(match, str(e.value)), str(e.value)
    assert not out.exists(), "bad input must leave nothing in the results folder"


def test_bad_input_is_refused_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    folder, jsonl = tiny_run
    out = tmp_path / "out"
    refused(["--model", str(tmp_path / "nope"), "--quick"], out, "--model .*no such model folder")
    refused(["--model", str(folder), "--tasks", str(jsonl), "--configs", "tl6", "--ranks", "40", "--n-test", "8"], out,
            "--configs tl6 --ranks 40 .*use rank <= 32")
    refused(["--model", str(folder), "--tasks", str(jsonl), "--configs", "tl99", "--n-test", "8"], out, "tl99")
    refused(["--tasks", "nli", "--data", str(tmp_path)], out, "no folder .*nli.*write its split files")
    (tmp_path / "nli").mkdir()
    (tmp_path / "nli" / "train.json").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": 0}) + "\n")
    refused(["--tasks", "nli", "--data", str(tmp_path)], out, "no 'test' split")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    refused(["--model", str(gguf), "--quick"], out, "needs the 'gguf' package")
    monkeypatch.undo()

    def no_half(self, x):
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return torch.nn.functional.linear(x, self.weight, self.bias)

    monkeypatch.setattr(torch.nn.Linear, "forward", no_half)
    refused(["--quick", "--dtype", "float16"], out, "--dtype float16 on --device cpu: this machine cannot run it")
    monkeypatch.undo()
    grid = tmp_path / "grid.yaml"
    grid.write_text(PAPER.read_text().replace("configs: [lora,", "configs: [tl99, lora,"))
    refused(["--plan", str(grid)], out, "config 'tl99' at rank 2 on models.llama2-7b")
    grid.write_text(PAPER.read_text().replace("ranks: [2,", "ranks: [5000, 2,"))
    refused(["--plan", str(grid)], out, "config .lora. at rank 5000 on models.llama2-7b.*use rank <= 4096")
    refused(["--grid", str(PAPER)], out, "fill in models.<name>.checkpoint for llama2-7b, gpt-2b-001")


def test_unknown_family_names_its_modules_and_runs_with_a_yaml_spec(tmp_path):
    """Bloom's `self_attention.query_key_value` is in no family: the error names the modules and the fix, and a
    spec YAML with the user's own targets then runs."""
    from test_llm_models import addition_jsonl
    from test_tasks import char_tokenizer
    tok = char_tokenizer()
    torch.manual_seed(0)
    transformers = pytest.importorskip("transformers")
    transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=len(tok),
                                                           pad_token_id=0, eos_token_id=2)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    jsonl = addition_jsonl(tmp_path / "add.jsonl")
    args = ["--model", str(tmp_path / "m"), "--tasks", str(jsonl), "--steps", "1", "--n-train", "4", "--n-test", "2",
            "--batch", "2", "--threads", "1"]
    refused([*args, "--configs", "tl6"], tmp_path / "out",
            "transformer.h.0.self_attention.query_key_value.*write a spec YAML.*pass its path to --configs")
    spec = tmp_path / "bloom-tl6.yaml"
    spec.write_text(tying.load_spec("tl6", targets=[{"select": "**.{layer:#}.self_attention.{proj:query_key_value}"}])
                    .to_yaml())
    report = run_cli([*args, "--configs", str(spec), "--lr", "1e-2"], tmp_path / "out")
    (row,) = [r for r in report["rows"] if r["config"] == str(spec)]
    assert row["trainable"] > 0 and row["lr"] == 1e-2
    assert (tmp_path / "out" / "parts" / "add.jsonl-bloom-tl6-r8-s0.json").exists()


def test_default_precision_is_bfloat16_on_cuda_and_float32_elsewhere(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(reproduce, "check", lambda s: None)  # no CUDA here: only the settings are under test
    monkeypatch.setattr(reproduce, "run", lambda s, out, resume, train: seen.append(s["dtype"]))
    for args in (["--device", "cuda"], ["--device", "cpu"], ["--device", "cuda", "--dtype", "float32"], ["--gpu"]):
        reproduce.main(["--quick", *args, "--out", str(tmp_path)])
    assert seen == ["bfloat16", "float32", "float32", "bfloat16"]
