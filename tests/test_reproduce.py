"""benchmarks/reproduce.py, a CLI over a run config, and the LLM kit it runs: which finished parts are reused and
reported, the sweep and its rule, the paper's grid, bad input refused before anything is written, shards, and whole
runs on a tiny local model (any model, dtype, the GPU config, a user's JSONL task with its own metric)."""
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tying

pytest.importorskip("transformers")
from tying.integrations.llm import grid, parts, rates
from tying.integrations.llm.runconfig import load_config
from tying.integrations.meta_models import meta_model

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)
CONFIGS = ROOT / "benchmarks" / "configs"
QUICK = CONFIGS / "quick.yaml"
TABLE = yaml.safe_load((CONFIGS / "rates" / "snli.yaml").read_text())["lr"]
pytestmark = pytest.mark.usefixtures("keep_threads")  # configs may set threads; the session gets its count back


def test_the_cli_is_thin():
    assert len((ROOT / "benchmarks" / "reproduce.py").read_text().splitlines()) <= 150


def _row(config, score, lr=None, rank=8, trainable=1000, **settings):
    part = {**grid.parts(load_config(QUICK))[0].row(), **settings}
    part.update(config=config, rank=0 if config == "zero-shot" else rank)
    row = {**part, "score": score, "trainable": 0 if config == "zero-shot" else trainable, "seconds": 1.0,
           "metrics": {"accuracy": score}}
    if config != "zero-shot":
        row["lr"] = TABLE[config] if lr is None else lr
    return row


def test_is_current_checks_settings_seed_and_lr(tmp_path):
    cfg = load_config(QUICK, [f"out={tmp_path}"])
    r = rates.Rates(cfg)
    assert parts.is_current(_row("lora", 30.0), cfg, r)
    assert not parts.is_current(_row("lora", 30.0, lr=1e-5), cfg, r)  # trained at another LR
    assert not parts.is_current(_row("lora", 30.0, steps=999), cfg, r)
    assert not parts.is_current(_row("lora", 30.0, seed=1), cfg, r)
    assert not parts.is_current(_row("lora", 30.0, task="squad"), cfg, r)  # not a task of this run
    # zero-shot does not train: only its test set (and seed) matter
    assert parts.is_current(_row("zero-shot", 1.0, steps=999, batch=1), cfg, r)
    assert not parts.is_current(_row("zero-shot", 1.0, n_test=7), cfg, r)
    # model, dtype and data: another one is never reused; rows from before these keys count as the defaults
    assert not parts.is_current(_row("lora", 30.0, dtype="bfloat16"), cfg, r)
    assert not parts.is_current(_row("zero-shot", 1.0, model="/ckpt/llama"), cfg, r)
    old = {k: v for k, v in _row("lora", 30.0).items() if k not in ("model", "dtype", "data", "max_len", "grad_accum")}
    assert parts.is_current({**old, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"}, cfg, r)
    # rates from a sweep: a cell the sweep has no pick for is not this run's, even at a matching rate
    swept = load_config(QUICK, [f"out={tmp_path}", "rates.table=null"])
    (tmp_path / "lr_sweep.json").write_text(json.dumps({"settings": rates.sweep_settings(swept), "results": [
        {"task": "nli", "config": "tl6", "rank": 8, "lr": lr, "score": s} for lr, s in ((0.01, 1.0), (0.05, 9.0),
                                                                                       (0.1, 2.0))]}))
    assert parts.is_current(_row("tl6", 30.0, lr=0.05), swept, rates.Rates(swept))
    assert not parts.is_current(_row("lora", 30.0), swept, rates.Rates(swept))


def test_resume_reuses_parts_and_reports_every_current_part(tmp_path, monkeypatch):
    (tmp_path / "parts").mkdir()
    rows = [_row("tl6", 38.0, trainable=100), _row("zero-shot", 1.0), _row("lora", 31.0),
            _row("tl5", 33.0, trainable=10),  # not asked for in this run, but finished at its rate under this policy
            _row("ia3", 34.0, lr=0.01),  # no rate for ia3 under this policy: not reported
            _row("vera", 99.0, lr=1e-5)]  # a stale LR: neither reused nor reported
    for r in rows:
        (tmp_path / "parts" / f"{grid.part_name(r)}.json").write_text(json.dumps(r))

    def fake_run_part(part, out, lr=None, val=0):
        assert part.config == "vera" and lr == 0.03, "only the stale part is rerun, at the table's rate"
        return _row("vera", 2.0, trainable=50)

    monkeypatch.setattr(parts, "run_part", fake_run_part)
    reproduce.main([str(QUICK), "resume=true", f"out={tmp_path}"])
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert [(r["config"], r["score"]) for r in report["rows"]] == [
        ("zero-shot", 1.0), ("lora", 31.0), ("vera", 2.0), ("tl5", 33.0), ("tl6", 38.0)]
    assert report["settings"]["steps"] == 30 and report["settings"]["model"]["dtype"] == "float32"
    md = (tmp_path / "reproduce.md").read_text()
    assert "| nli | accuracy | tl6 | 8 | 0 | 38.00 | 100 | 10.0 |" in md  # seed 0; percent of LoRA's 1,000


def _sweep_cfg(tmp_path, *extra):
    return load_config(QUICK, [f"out={tmp_path}", "rates.table=null", "configs=[tl6]", *extra])


def test_sweeps_side_by_side_keep_each_others_results(tmp_path, monkeypatch):
    cfg = _sweep_cfg(tmp_path, "rates.sweep.grid=[0.001, 0.01]", "rates.sweep.extend=false")
    f = tmp_path / "lr_sweep.json"
    f.write_text(json.dumps({"settings": rates.sweep_settings(cfg), "results": [
        {"task": "nli", "config": "lora", "lr": 0.01, "score": 30.0}]}))

    def fake_run_part(part, out, lr=None, val=0):
        assert val == 100 and part.seed == 0, "the sweep scores held-out training examples, seed 0"
        other = json.loads(f.read_text())  # another sweep finishes a point while this one trains
        other["results"].append({"task": "nli", "config": "vera", "lr": lr, "score": 5.0})
        f.write_text(json.dumps(other))
        return {"score": 40.0 + 1000 * lr, "seconds": 2.0, "eval_seconds": 1.0, "loss_last": 0.5}

    monkeypatch.setattr(parts, "run_part", fake_run_part)
    rates.sweep(cfg, rates.Rates(cfg))
    got = {(r["config"], r["lr"]): r["score"] for r in json.loads(f.read_text())["results"]}
    assert got == {("lora", 0.01): 30.0, ("vera", 0.001): 5.0, ("vera", 0.01): 5.0,
                   ("tl6", 0.001): 41.0, ("tl6", 0.01): 50.0}
    assert "| nli (accuracy) | tl6 | 8 | 41.0 | 50.0 | 0.01 (edge: extend) |" in (tmp_path / "lr_sweep.md").read_text()


def test_the_lr_rule_and_the_grid_extension(tmp_path, monkeypatch):
    assert rates.best_lr({1e-3: 40.0, 3e-3: 47.0, 1e-2: 47.0, 3e-2: 0.0}) == 3e-3  # a tie: the smaller rate
    assert not rates.at_edge({1e-3: 40.0, 3e-3: 47.0, 1e-2: 47.0})
    assert rates.at_edge({1e-3: 40.0, 3e-3: 41.0}) and rates.at_edge({1e-3: 42.0, 3e-3: 41.0})
    assert [rates.next_rate(lr, up=True) for lr in (1e-3, 3e-3, 1e-2, 3e-2)] == [3e-3, 1e-2, 3e-2, 1e-1]
    assert [rates.next_rate(lr, up=False) for lr in (1e-3, 3e-3, 1e-1)] == [3e-4, 1e-3, 3e-2]
    # extend: a cell peaking at the top edge gets 3e-2, then 1e-1 (which scores worse), and stops there
    cfg = _sweep_cfg(tmp_path, "rates.sweep.grid=[0.001, 0.003, 0.01]")
    peak = {1e-3: 30.0, 3e-3: 35.0, 1e-2: 40.0, 3e-2: 45.0, 1e-1: 10.0}
    ran = []
    monkeypatch.setattr(parts, "run_part", lambda part, out, lr=None, val=0: ran.append(lr) or
                        {"score": peak[lr], "seconds": 1.0, "eval_seconds": 0.0, "loss_last": 1.0})
    assert rates.Rates(cfg).unswept(cfg, grid.cells(cfg)) == ["nli/tl6/r8 (not swept)"]
    rates.sweep(cfg, rates.Rates(cfg))
    assert ran == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    rates.sweep(cfg, rates.Rates(cfg))
    assert len(ran) == 5, "finished cells are not rerun"
    assert rates.Rates(cfg)("nli", "tl6", 8) == (3e-2, "sweep")
    # a sweep at other settings is not this one's: its picks are not used
    assert rates.Rates(_sweep_cfg(tmp_path, "rates.sweep.n_val=50"))("nli", "tl6", 8) == (None, "sweep")


def test_a_cell_without_signal_stops_extending_and_has_no_rate(tmp_path, monkeypatch):
    assert rates.no_signal({3e-3: 0.0, 1e-2: 0.0}) and not rates.no_signal({3e-3: 0.0})
    assert not rates.no_signal({3e-3: 0.0, 1e-2: 1.0})
    ran = []
    monkeypatch.setattr(parts, "run_part", lambda part, out, lr=None, val=0: ran.append(lr) or
                        {"score": 0.0, "seconds": 1.0, "eval_seconds": 0.0, "loss_last": 1.0})
    with pytest.raises(SystemExit, match=r"the sweep gave no rate for nli/tl6/r8 \(no signal: every rate scored"):
        reproduce.main([str(QUICK), f"out={tmp_path}", "rates.table=null", "configs=[tl6]"])
    assert ran == [3e-3, 1e-2, 3e-2], "a floor cell does not walk the rate ladder down to 1e-5"
    assert "| none (no signal) |" in (tmp_path / "lr_sweep.md").read_text()
    assert not (tmp_path / "parts").exists()


def _fake_run(part, out, lr=None, val=0):
    """A sweep run (``val``) or a part, finished at once: a peak inside the default grid, a 3 s run, a 1 min part."""
    if val:
        return {"score": {3e-3: 1.0, 1e-2: 5.0, 3e-2: 2.0}[lr], "seconds": 2.0, "eval_seconds": 1.0, "loss_last": 0.5}
    return {**part.row(), "lr": lr, "trainable": 0 if lr is None else 41328, "seconds": 50.0, "eval_seconds": 10.0,
            "score": 38.3, "metrics": {"accuracy": 38.3}, "loss": [2.0, 1.0]}


def test_a_sweep_and_its_parts_print_a_line_per_finished_run_with_the_time_left(tmp_path, monkeypatch, capsys):
    """A sweeping run printed nothing until its first sweep run finished, then a Python dict per run. Off a
    terminal: a line announcing the runs, then one line per finished run with the elapsed time and the time left."""
    monkeypatch.setattr(parts, "run_part", _fake_run)
    reproduce.main([str(QUICK), f"out={tmp_path}", "rates.table=null", "configs=[tl6]"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "sweep: 3 runs to go" in lines and "parts: 2 runs to go" in lines
    t = r"(\d+s|\d+m\d\ds)"
    assert re.fullmatch(rf"\[1/3\] sweep nli/tl6/r8 lr 0\.003: accuracy 1\.0 on 100 held-out, loss 0\.500 \(3s\); "
                        rf"{t} elapsed, about {t} left", lines[lines.index("sweep: 3 runs to go") + 1])
    assert re.search(rf"^\[3/3\] sweep nli/tl6/r8 lr 0\.03: accuracy 2\.0 .*; {t} elapsed$", out, re.MULTILINE)
    assert re.search(rf"^\[1/2\] nli-zero-shot-r0-s0: accuracy 38\.30 \(1m00s\); {t} elapsed, about {t} left$", out,
                     re.MULTILINE)
    assert re.search(rf"^\[2/2\] nli-tl6-r8-s0: accuracy 38\.30, lr 0\.01, 41,328 trainable \(1m00s\); {t} elapsed$",
                     out, re.MULTILINE)
    assert "{'task'" not in out and "run/s" not in err  # no dicts; no bar off a terminal


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_sweep_shows_a_bar_with_the_time_left(tmp_path, monkeypatch, capsys):
    """On a terminal the sweep's runs are a bar (tqdm) with elapsed<remaining, grown when the edge moves; without
    tqdm, the lines alone."""
    from tying.integrations.llm.progress import clock
    assert [clock(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
    peak = {1e-3: 30.0, 3e-3: 35.0, 1e-2: 40.0, 3e-2: 45.0, 1e-1: 10.0}  # at the top edge twice: two runs more
    monkeypatch.setattr(parts, "run_part", lambda part, out, lr=None, val=0:
                        {"score": peak[lr], "seconds": 1.0, "eval_seconds": 0.0, "loss_last": 1.0})
    for folder, tqdm_installed in (("a", True), ("b", False)):
        if not tqdm_installed:
            monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # an import of it fails
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        cfg = _sweep_cfg(tmp_path / folder, "rates.sweep.grid=[0.001, 0.003, 0.01]")
        rates.sweep(cfg, rates.Rates(cfg))
        bar, out = terminal.getvalue(), capsys.readouterr().out
        assert "sweep: 3 runs to go" in out and "[3/3] sweep nli/tl6/r8 lr 0.01" in out and "[5/5] sweep" in out
        if tqdm_installed:
            assert re.search(r"sweep: nli/tl6/r8 lr 0\.1: 100%\|.*\| 5/5 \[\d\d:\d\d<\d\d:\d\d", bar), bar[-500:]
        else:
            assert bar == ""


def test_seeds_and_per_task_test_sizes_add_up_to_one_report(tmp_path, monkeypatch):
    def fake_run_part(part, out, lr=None, val=0):
        per = [100.0] * (part.seed + 1) + [0.0] * (part.n_test - part.seed - 1)
        return {**part.row(), "lr": lr, "trainable": 10, "seconds": 3600.0, "eval_seconds": 0.0, "score": sum(per) / len(per),
                "metrics": {"accuracy": 0.0, "per_example": per}, "loss": [4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]}

    monkeypatch.setattr(parts, "run_part", fake_run_part)
    args = [str(QUICK), "configs=[lora]", "steps=8", "n_train=8", "batch=2", "rates.lr={lora: 0.01}", f"out={tmp_path}",
            "n_test=4"]
    reproduce.main([*args, "tasks=[nli, translation]", "stage=report"])  # nothing finished yet: an empty report
    assert "| task | metric | config |" in (tmp_path / "reproduce.md").read_text()
    reproduce.main([*args, "tasks=[{name: nli, n_test: 5}, translation]", "seeds=[0, 1]"])
    rows = json.loads((tmp_path / "reproduce.json").read_text())["rows"]
    assert [(r["task"], r["config"], r["seed"], r["n_test"]) for r in rows] == [
        ("nli", "zero-shot", 0, 5), ("nli", "lora", 0, 5), ("nli", "lora", 1, 5),  # zero-shot: first seed only
        ("translation", "zero-shot", 0, 4), ("translation", "lora", 0, 4), ("translation", "lora", 1, 4)]
    md = (tmp_path / "reproduce.md").read_text()
    assert "400 training" not in md and "8 training / 4, nli 5 test examples per task" in md
    assert "| nli | lora | 8 | 2 | 30.0 ± 14.1 |" in md  # seed means 20 and 40 (1 and 2 of 5 right)
    # loss: first 10 % of 8 steps = step 1 (4.0), last quarter 1.0, third quarter 1.0: nothing left to fall
    assert "| nli | lora | 8 | 8 | 4.000 | 1.000 | 0% |" in md
    assert "| nli | lora | 0.00 | 2.00 |" in md  # two one-hour parts
    assert (tmp_path / "reproduce-loss.png").exists()
    monkeypatch.setattr(parts, "run_part", lambda *a, **k: pytest.fail("stage=report trains nothing"))
    reproduce.main([*args, "tasks=[{name: nli, n_test: 5}, translation]", "seeds=[0]", "stage=report"])
    assert [r["seed"] for r in json.loads((tmp_path / "reproduce.json").read_text())["rows"]] == [0] * 4


def test_adapt_seeds_presets_without_their_own_seed():
    from conftest import tiny_llama

    def bank(seed, rng_state):  # LoRA's A has no seed in the preset: it draws from the global RNG
        model = tiny_llama()
        torch.manual_seed(rng_state)  # whatever state the process was in (it differs between processes)
        parts.adapt(model, "lora", 4, seed)
        return {k: v.clone() for k, v in model.tying_bank.state_dict().items()}

    a, b, c = bank(0, rng_state=1), bank(0, rng_state=2), bank(1, rng_state=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- the paper's grid, whole runs, bad input
PAPER = CONFIGS / "paper.yaml"


def test_plan_prints_the_papers_grid_with_exact_counts(capsys):
    rows = grid.plan_rows(load_config(PAPER))
    at = {(r["config"], r["rank"]): r["trainable"] for r in rows if r["task"] == "squad"}
    assert at["lora", 8] == 4_194_304 and at["tl6", 8] == 524_544  # PAPER.md, LLaMA-2 7B
    assert {r["rank"] for r in rows} == {2, 8, 16, 32, 64, 128} and {"tl5", "vera", "tied-v"} <= {r["config"] for r in rows}
    assert len(rows) == 5 * 6 * 9 and all(r["gpu_hours"] > 0 and r["model"] == "llama2-7b" for r in rows)
    gpt = {(r["config"], r["rank"]): r["trainable"] for r in grid.plan_rows(load_config(PAPER, ["model.shape=gpt-2b-001"]))}
    assert gpt["lora", 128] == 25_165_824 and gpt["tl6", 2] == 163_888
    reproduce.main([str(PAPER), "stage=plan"])  # loads no weights: the checkpoint need not exist
    assert "| llama2-7b | tl6 | 8 | 524,544 | 5 |" in capsys.readouterr().out



def test_plan_counts_a_spec_file_with_its_own_targets(tmp_path):
    """A spec-file config is planned as it is trained (parts.spec_of: its own targets), not retargeted to q/k/v:
    a q_proj-only TL6 counts what it trains."""
    spec = yaml.safe_load((ROOT / "examples" / "llm_tl6.yaml").read_text())
    spec["targets"][0]["select"] = "model.layers.{layer:#}.self_attn.{proj:q_proj}"
    (tmp_path / "q_only.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_config(PAPER, [f"configs=[{tmp_path / 'q_only.yaml'}]", "ranks=[8]"])
    model = meta_model("llama2-7b")
    want = tying.count(model, tying.load_spec(str(tmp_path / "q_only.yaml"), rank=8)).trainable
    assert {r["trainable"] for r in grid.plan_rows(cfg)} == {want}
    assert want < tying.count(model, tying.load_spec(str(ROOT / "examples" / "llm_tl6.yaml"), rank=8)).trainable

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_llm_models import addition_jsonl, tiny_llm_folder
    root = tmp_path_factory.mktemp("tiny")
    return tiny_llm_folder(root / "model"), addition_jsonl(root / "add.jsonl")


def tiny_config(path, folder, jsonl, **over):
    """A run config on the tiny folder: one thread, the CPU, one JSONL task, a few steps and test examples."""
    cfg = {"model": {"name": str(folder), "device": "cpu"}, "tasks": [str(jsonl)], "configs": ["tl6"], "steps": 2,
           "batch": 2, "n_train": 8, "n_test": 4, "threads": 1, "rates": {"lr": {"tl6": 0.01}},
           "out": str(path.parent / "out"), **over}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(config, *overrides):
    reproduce.main([str(config), *overrides])
    return json.loads((Path(load_config(config, overrides).out) / "reproduce.json").read_text())


def test_any_model_folder_in_bfloat16(tiny_run, tmp_path):
    folder, jsonl = tiny_run
    report = run_cli(tiny_config(tmp_path / "c.yaml", folder, jsonl, n_train=16, n_test=8), "model.dtype=bfloat16")
    (tl6,) = [r for r in report["rows"] if r["config"] == "tl6"]
    # rank 8, d 32, q 32 / k 16 / v 16, 2 layers: A and B tied once, u and v per layer
    assert tl6["trainable"] == 8 * 32 + (32 + 16 + 16) * 8 + 2 * (8 + 32 + 16 + 16)
    assert 0 <= tl6["score"] <= 100 and tl6["dtype"] == "bfloat16" and tl6["tokens"] > 0
    assert tl6["metric"] == "exact_match"  # one-word answers: exact match is right for them
    assert (tmp_path / "out" / "adapters" / "add.jsonl-tl6-r8-s0" / "adapter.safetensors").exists()


def test_a_run_off_a_terminal_logs_a_line_per_part_and_no_loading_bars(tiny_run, tmp_path, capsys):
    """In a log (no terminal) each part is one line with the time left, and transformers' loading bars (a line of
    carriage returns per part) stay out of it."""
    folder, jsonl = tiny_run
    run_cli(tiny_config(tmp_path / "c.yaml", folder, jsonl))
    out, err = capsys.readouterr()
    assert re.search(r"^\[1/2\] add\.jsonl-zero-shot-r0-s0: exact_match [\d.]+ \(\d+s\); \d+s elapsed, about \d+s left$",
                     out, re.MULTILINE), out
    assert re.search(r"^\[2/2\] add\.jsonl-tl6-r8-s0: exact_match [\d.]+, lr 0\.01, [\d,]+ trainable \(\d+s\); \d+s "
                     r"elapsed$", out, re.MULTILINE), out
    assert "Loading weights" not in err and "it/s]" not in err, err[-500:]


def test_a_jsonl_task_with_chrf_on_a_saved_folder(tiny_run, tmp_path, capsys):
    """The issue's contract: a JSONL task naming metric chrf, run on a local save_pretrained folder, writes rows whose
    headline is chrF; without max_new_tokens the generation length is sized to the longest answer."""
    folder, _ = tiny_run
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"Spell {i}", "answer": f"the number {i} spelled in many words "
                                         + "and more " * (i % 7)}) + "\n" for i in range(24)))
    config = tiny_config(tmp_path / "c.yaml", folder, jsonl, tasks=[{"name": str(jsonl), "metric": "chrf"}])
    report = run_cli(config)
    assert "no max_new_tokens given" in capsys.readouterr().out
    assert [r["config"] for r in report["rows"]] == ["zero-shot", "tl6"]
    for row in report["rows"]:
        assert row["metric"] == "chrf" and row["score"] == row["metrics"]["chrf"] and row["max_new_tokens"] > 32
        assert len(row["metrics"]["per_example"]) == 4
    assert re.search(r"\| .*long.jsonl \| chrf \| tl6 \|", (tmp_path / "out" / "reproduce.md").read_text())


def test_two_shards_add_up_to_the_unsharded_run(tiny_run, tmp_path):
    folder, jsonl = tiny_run
    config = tiny_config(tmp_path / "c.yaml", folder, jsonl, configs=["tl6", "lora"], seeds=[0, 1],
                         rates={"lr": {"tl6": 0.01, "lora": 0.01}})
    whole = run_cli(config, f"out={tmp_path / 'whole'}")["rows"]
    first = run_cli(config, f"out={tmp_path / 'sharded'}", "shard=1/2")["rows"]
    merged = run_cli(config, f"out={tmp_path / 'sharded'}", "shard=2/2")["rows"]  # its report merges both shards
    names = lambda rows: [grid.part_name(r) for r in rows]
    assert len(whole) == 5 and 0 < len(first) < len(whole)
    assert sorted(p.name for p in (tmp_path / "sharded" / "parts").glob("*.json")) == sorted(
        p.name for p in (tmp_path / "whole" / "parts").glob("*.json"))
    assert names(merged) == names(whole)
    measured = ("score", "trainable", "lr", "loss", "metrics")
    assert [{k: r.get(k) for k in measured} for r in merged] == [{k: r.get(k) for k in measured} for r in whole]


def test_a_new_task_gets_a_short_sweep_or_a_warning(tiny_run, tmp_path, monkeypatch, capsys):
    folder, jsonl = tiny_run
    real = parts.run_part

    def run_part(part, out, lr=None, val=0):
        if val:  # the sweep: a made-up validation score that peaks inside the grid
            return {"score": {3e-3: 1.0, 1e-2: 5.0, 3e-2: 2.0}[lr], "seconds": 0.0, "eval_seconds": 0.0, "loss_last": 1.0}
        return real(part, out, lr=lr, val=val)

    monkeypatch.setattr(parts, "run_part", run_part)
    config = tiny_config(tmp_path / "c.yaml", folder, jsonl, rates={"table": str(CONFIGS / "rates" / "snli.yaml")})
    report = run_cli(config)
    assert (tmp_path / "out" / "lr_sweep.json").exists()
    assert [r.get("lr") for r in report["rows"]] == [None, 1e-2]  # the sweep's pick, not the SNLI table's 3e-3
    capsys.readouterr()
    report = run_cli(config, "rates.sweep=null", f"out={tmp_path / 'off'}")
    assert re.search(r"warning: .*add.jsonl: the rates of tl6 r8 come from the table .*snli.yaml, swept on nli",
                     capsys.readouterr().out)
    assert [r.get("lr") for r in report["rows"]] == [None, 3e-3]


def test_the_gpu_config_runs_on_the_cpu(tiny_run, tmp_path):
    """gpu.yaml is the same code path as every run: here tiny, on the CPU."""
    folder, jsonl = tiny_run
    report = run_cli(CONFIGS / "gpu.yaml", f"model.name={folder}", "model.device=cpu", f"tasks=[{jsonl}]", "steps=2",
                     "n_train=8", "n_test=4", "batch=2", "threads=1", f"out={tmp_path}", "rates.lr={tl5: 0.01}")
    assert report["settings"]["model"]["dtype"] == "bfloat16" and report["settings"]["gen_batch"] == 64
    assert [r["config"] for r in report["rows"]] == ["zero-shot", "lora", "vera", "tl5", "tl6"]


def refused(args, out, match):
    with pytest.raises(SystemExit) as e:
        reproduce.main([*map(str, args), f"out={out}"])
    assert re.search(match, str(e.value)), str(e.value)
    assert not out.exists(), "bad input must leave nothing in the results folder"


def test_bad_input_is_refused_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    folder, jsonl = tiny_run
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "c.yaml", folder, jsonl)
    refused([QUICK, f"model.name={tmp_path / 'nope'}"], out, "no such model folder")
    refused([config, "ranks=[40]"], out, "configs tl6 at rank 40 .*use rank <= 32")
    refused([config, "configs=[tl99]"], out, "tl99")
    refused([QUICK, f"data={tmp_path}"], out, "no folder .*nli.*write its split files")
    (tmp_path / "nli").mkdir()
    (tmp_path / "nli" / "train.json").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": 0}) + "\n")
    refused([QUICK, f"data={tmp_path}"], out, "no 'test' split")
    refused([QUICK, "stpes=3"], out, "no key stpes; did you mean 'steps'")
    refused([QUICK, "tasks=[{name: x.jsonl, metric: blue}]"], out, "metric: Input should be 'exact_match'")
    refused([QUICK, "shard=3/2"], out, "shard 3/2")
    refused([tmp_path / "none.yaml"], out, "no such config file")
    refused(["steps=3"], out, "the first argument is a config file")
    refused([config, "n_test=40"], out, r"add.jsonl: 30 usable lines, but n_test 40")
    refused([config, "rates.lr={}", "rates.sweep.n_train=40"], out, r"the sweep trains on 40 of the 26 lines")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="a_file is a file; give a folder"):
        reproduce.main([str(config), f"out={tmp_path / 'a_file'}"])
    assert (tmp_path / "a_file").read_text() == "x"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    refused([QUICK, f"model.name={gguf}"], out, "needs the 'gguf' package")
    monkeypatch.undo()

    def no_half(self, x):
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return torch.nn.functional.linear(x, self.weight, self.bias)

    monkeypatch.setattr(torch.nn.Linear, "forward", no_half)
    refused([QUICK, "model.dtype=float16", "model.device=cpu"], out, "model.dtype float16 on model.device cpu: this machine cannot")
    monkeypatch.undo()
    paper = tmp_path / "paper.yaml"
    paper.write_text(PAPER.read_text().replace("configs: [lora,", "configs: [tl99, lora,"))
    refused([paper, "stage=plan"], out, "config 'tl99' at rank 2 on llama2-7b")
    paper.write_text(PAPER.read_text().replace("ranks: [2,", "ranks: [5000, 2,"))
    refused([paper, "stage=plan"], out, "config .lora. at rank 5000 on llama2-7b.*use rank <= 4096")


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
    config = tiny_config(tmp_path / "c.yaml", tmp_path / "m", addition_jsonl(tmp_path / "add.jsonl"), steps=1,
                         n_train=4, n_test=2)
    refused([config], tmp_path / "out",
            "transformer.h.0.self_attention.query_key_value.*write a spec YAML.*name its path in configs")
    spec = tmp_path / "bloom-tl6.yaml"
    spec.write_text(tying.load_spec("tl6", targets=[{"select": "**.{layer:#}.self_attention.{proj:query_key_value}"}])
                    .to_yaml())
    report = run_cli(config, f"configs=[{spec}]", "rates.lr={bloom-tl6: 1.0e-2}")
    (row,) = [r for r in report["rows"] if r["config"] == str(spec)]
    assert row["trainable"] > 0 and row["lr"] == 1e-2
    assert (tmp_path / "out" / "parts" / "add.jsonl-bloom-tl6-r8-s0.json").exists()


def test_a_peft_config_runs_in_the_same_harness_as_ours(tiny_run, tmp_path):
    """A ``peft:`` file builds PEFT's own method with get_peft_model (the cell's rank as r) and runs as any config:
    trained, scored and saved (PEFT's folder) beside ours; counted on the meta model as it trains (the plan), the same
    count as our preset at the same knobs. The PEFT Lily and ours start from other random draws, so only the counts
    and the harness are compared here (their outputs: tests/test_pools.py)."""
    peft = pytest.importorskip("peft")
    from tying.integrations.llm.models import load_model
    folder, jsonl = tiny_run
    theirs = tmp_path / "peft-lily.yaml"
    theirs.write_text(yaml.safe_dump({"peft": {"peft_type": "LILY", "r": 99, "stride_A": 2, "num_B": 3,
                                               "target_modules": ["q_proj", "k_proj", "v_proj"]}}))
    ours = tmp_path / "lily.yaml"
    ours.write_text(tying.load_spec("lily", rank=4, stride_a=2, num_b=3,
                                    targets=[{"select": "model.layers.{layer:#}.self_attn.{proj:q_proj|k_proj|v_proj}"}])
                    .to_yaml())
    config = tiny_config(tmp_path / "c.yaml", folder, jsonl, configs=[str(theirs), str(ours)], ranks=[4],
                         rates={"lr": {"peft-lily": 0.01, "lily": 0.01}})
    report = run_cli(config)
    rows = {Path(r["config"]).stem: r for r in report["rows"] if r["config"] != "zero-shot"}
    model, _ = load_model(str(folder), dtype="float32", device="cpu")
    want = peft.get_peft_model(model, peft.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "k_proj",
                                                                                               "v_proj"]))
    assert rows["peft-lily"]["trainable"] == rows["lily"]["trainable"] == want.get_nb_trainable_parameters()[0]
    assert all(0 <= r["score"] <= 100 and r["loss_last"] > 0 for r in rows.values())
    saved = tmp_path / "out" / "adapters" / "add.jsonl-peft-lily-r4-s0"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4  # the cell's rank, not the file's 99
    planned = {r["config"]: r["trainable"] for r in grid.plan_rows(load_config(config))}
    assert planned[str(theirs)] == planned[str(ours)] == rows["lily"]["trainable"]
    # a file with peft and anything else, or without peft_type, is refused before anything is written
    theirs.write_text(yaml.safe_dump({"peft": {"peft_type": "LILY"}, "adapter": {"rank": 4}}))
    refused([config], tmp_path / "o2", "holds one key, peft, a mapping with peft_type")
    theirs.write_text(yaml.safe_dump({"peft": {"peft_type": "NOPE"}}))
    refused([config], tmp_path / "o2", "peft config .*NOPE")


def test_default_precision_is_bfloat16_on_cuda_and_float32_elsewhere():
    got = [grid.dtype_of(load_config(QUICK, over)) for over in (["model.device=cuda"], ["model.device=cpu"],
           ["model.device=cuda", "model.dtype=float32"], ["model.device=cuda:1"])]
    assert got == ["bfloat16", "float32", "float32", "bfloat16"]
    assert load_config(CONFIGS / "gpu.yaml").model.dtype == "bfloat16"


def test_help_and_module_entry(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--help"])
    reproduce.main()
    assert "CONFIG.yaml [key=value ...]" in capsys.readouterr().out
