"""benchmarks/llm_tasks.py on a tiny local model: the LLM tasks trained jointly (one TL6 across tasks, mixed
batches, per-task rates) against separate runs of reproduce.py, reported with intervals; a finished seed is kept."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import torch
import yaml
from tying.integrations.llm import grid, parts
from tying.integrations.llm.runconfig import load_config

import tying

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import llm_tasks
import reproduce

pytestmark = pytest.mark.usefixtures("keep_threads")


def test_joint_against_separate_on_two_jsonl_tasks(tmp_path, capsys):
    from test_llm_models import addition_jsonl, tiny_llm_folder
    folder = tiny_llm_folder(tmp_path / "model")
    add = addition_jsonl(tmp_path / "add.jsonl")
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"prompt": f"Say {i} twice", "answer": f"{i} {i}"}) + "\n" for i in range(30)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(folder), "device": "cpu"}, "tasks": [str(add), str(twice)], "configs": ["lora", "tl6"],
        "seeds": [0, 1], "steps": 2, "batch": 2, "n_train": 6, "n_test": 4, "threads": 1,
        "rates": {"lr": {"tl6": 0.01, "twice.jsonl/tl6": 0.03, "lora": 0.01}}, "out": str(tmp_path / "sep")}))
    reproduce.main([str(config)])
    llm_tasks.main([str(config), f"out={tmp_path / 'joint'}"])
    part = json.loads((tmp_path / "joint" / "parts" / "joint-tl6-r8-s1.json").read_text())
    # rank 8, d 32, q 32 / k 16 / v 16, 2 layers: A and B tied once; u per layer and task, v per module and task
    per_task = 2 * (8 + 32 + 16 + 16)
    assert part["per_task"] == per_task and part["trainable"] == 8 * 32 + (32 + 16 + 16) * 8 + 2 * per_task
    assert (part["steps"], part["lr"], part["lr_shared"]) == (4, {"add": 0.01, "twice": 0.03}, 0.02)
    assert set(part["tasks"]) == {str(add), str(twice)} and all(len(t["metrics"]["per_example"]) == 4
                                                                for t in part["tasks"].values())
    md = (tmp_path / "joint" / "llm_tasks.md").read_text()
    assert md.count("| exact_match |") == 2 and "Seeds 0, 1" in md and "one more task adds 144" in md
    summary = json.loads((tmp_path / "joint" / "llm_tasks.json").read_text())["summary"]
    assert set(summary[str(add)]) == {"lora", "tl6"} and summary[str(add)]["tl6"]["lo"] <= summary[str(add)]["tl6"]["hi"]
    # the saved folder holds both tasks; one loads alone as a plain adapter and scores what the joint run reported
    from tying.integrations.llm.models import load_model
    from tying.integrations.llm.tasks import get_task
    model, tok = load_model(str(folder), dtype="float32", device="cpu")
    tying.load_adapter(model, tmp_path / "joint" / "adapters" / "joint-tl6-r8-s1", task="twice")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8 * 32 + (32 + 16 + 16) * 8 + per_task
    got = part["tasks"][str(twice)]
    task = get_task(str(twice), metric=got["metric"], max_new_tokens=got["max_new_tokens"])
    one = next(p for p in grid.parts(load_config(config, ["seeds=[1]"])) if p.task == str(twice))  # n_train 6, n_test 4
    _, test = parts.data_of(one, task)
    alone = parts.evaluate(model, tok, task, test)
    assert alone["examples"] == got["metrics"]["examples"] and alone["per_example"] == got["metrics"]["per_example"]
    assert len(set(alone["examples"])) > 1  # answers that tell adapters apart (a tiny random model: not the targets)
    capsys.readouterr()
    llm_tasks.main([str(config), f"out={tmp_path / 'joint'}"])  # resumes: both seeds are done
    assert capsys.readouterr().out.count("done already") == 2
    # a finished seed at other settings is not this run's: not reported, retrained on a run
    with pytest.raises(SystemExit, match="no finished joint seed at these settings"):
        llm_tasks.main([str(config), f"out={tmp_path / 'joint'}", "steps=3", "--report"])
    # bad input stops before anything is written
    (tmp_path / "-x.jsonl").write_text(twice.read_text())  # its name cannot name a task of a spec
    for bad, match in [(["configs=[lora]"], "lack tl6 r8 for"), (["rates.lr={lora: 0.01}", "rates.sweep=null"],
                                                                  r"rate for .*add.jsonl/tl6"),
                       ([f"tasks=[{add}, {tmp_path / '-x.jsonl'}]", "rates.lr={tl6: 0.01, lora: 0.01}"],
                        r"tasks\.1: String should match pattern")]:
        with pytest.raises(SystemExit, match=match):
            llm_tasks.main([str(config), f"out={tmp_path / 'never'}", *bad])
    assert not (tmp_path / "never").exists()


def test_joint_seeds_resume_through_the_kits_driver(tmp_path, monkeypatch, capsys):
    """The joint run had its own resume loop (no progress line); now the kit's driver: a finished current seed is
    kept, a stale one rerun, a missing one run, each with the kit's line and time left; --report runs none."""
    from test_llm_models import addition_jsonl, tiny_llm_folder
    add, twice = addition_jsonl(tmp_path / "add.jsonl"), addition_jsonl(tmp_path / "twice.jsonl")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llm_folder(tmp_path / "model")), "device": "cpu"}, "configs": ["tl6"],
        "tasks": [{"name": str(t), "metric": "exact_match", "max_new_tokens": 4} for t in (add, twice)],
        "seeds": [0, 1, 2], "steps": 2, "batch": 2, "n_train": 6, "n_test": 4, "threads": 1,
        "rates": {"lr": {"tl6": 0.01}}, "out": str(tmp_path / "sep")}))
    ran, reported, driven = [], [], []

    def joint_part(cfg, want, seed, out):  # what the real one records, without a model
        ran.append(seed)
        return {**{k: v for k, v in want.items() if k != "n_test"}, "seed": seed, "config": "tl6", "rank": 8,
                "tasks": {t.name: {"score": 10.0 * seed, "n_test": cfg.n_test_of(t)} for t in cfg.tasks}}

    def drive(items, *args, **kwargs):
        driven.append([name for name, *_ in items])
        return real_drive(items, *args, **kwargs)

    real_drive = parts.drive
    monkeypatch.setattr(llm_tasks, "joint_part", joint_part)
    monkeypatch.setattr(parts, "drive", drive)
    monkeypatch.setattr(llm_tasks, "report", lambda cfg, rates, joint, out: reported.append(sorted(joint)) or "")
    run = lambda *extra: llm_tasks.main([str(config), f"out={tmp_path / 'joint'}", *extra])
    run("seeds=[0]")
    assert ran == [0] and reported == [[0]] and driven == [["joint-tl6-r8-s0"]]
    f = {s: tmp_path / "joint" / "parts" / f"joint-tl6-r8-s{s}.json" for s in range(3)}
    done = json.loads(f[0].read_text())
    assert done["cpu_seconds"] >= 0 and list(done)[-1] == "cpu_seconds"  # the row as before, its CPU time last
    f[1].write_text(json.dumps({**done, "seed": 1, "steps": 999}))  # a seed finished at other settings
    capsys.readouterr()
    run("--report")  # only the finished current seeds: nothing runs
    assert ran == [0] and reported[-1] == [0] and "done already: joint-tl6-r8-s0.json" in capsys.readouterr().out
    run()
    out = capsys.readouterr().out
    assert ran == [0, 1, 2] and reported[-1] == [0, 1, 2] and driven[-1] == [f"joint-tl6-r8-s{s}" for s in range(3)]
    assert out.count("done already") == 1 and "joint seeds: 2 runs to go" in out
    scores = re.escape(f"{add} 10.00, {twice} 10.00")
    assert re.search(rf"^\[1/2\] joint-tl6-r8-s1: {scores} \(\d+s CPU\); \d+s elapsed, about \d+s left$", out,
                     re.MULTILINE), out
    assert json.loads(f[1].read_text())["steps"] == 4  # rerun at this run's settings (2 steps x 2 tasks)


def test_committed_joint_seeds_report_identically_through_the_driver(tmp_path, capsys):
    """The committed joint parts are still current under the command that wrote them: --report (no training)
    regenerates the committed report byte for byte."""
    src = ROOT / "benchmarks" / "results" / "llm-tasks"
    shutil.copytree(src / "parts", tmp_path / "parts")
    llm_tasks.main(["tasks=[{name: nli, n_test: 500}, squad, translation, gsm8k]", f"out={tmp_path}", "--report"])
    assert capsys.readouterr().out.count("done already") == 3
    for name in ("llm_tasks.md", "llm_tasks.json"):
        assert (tmp_path / name).read_bytes() == (src / name).read_bytes(), name


def test_committed_parts_are_the_records_rows():
    """Every part of seeded.yaml has its committed row under the record's name, current under the config, with the
    record's fields as that row holds them: a rerun writes the same part fields, a resume reuses every part."""
    from tying.integrations.llm.rates import Rates
    cfg = load_config(ROOT / "benchmarks" / "configs" / "seeded.yaml")
    rates = Rates(cfg)
    for part in grid.parts(cfg):
        row = json.loads((ROOT / cfg.out / "parts" / f"{part.name}.json").read_text())
        assert {k: row[k] for k in part.row()} == part.row() and grid.part_name(row) == part.name
        assert parts.is_current(row, cfg, rates), part.name
    jsonl = load_config(ROOT / "benchmarks" / "configs" / "quick.yaml", ["tasks=[{name: a.jsonl, metric: chrf}]"])
    assert list(grid.parts(jsonl)[0].row()) == [  # the keys and order the kit wrote as dicts
        "steps", "n_train", "batch", "model", "dtype", "data", "max_len", "grad_accum", "device",
        "gradient_checkpointing", "gen_batch", "n_test", "seed", "task", "metric", "max_new_tokens", "config", "rank"]
    assert "metric" not in grid.parts(cfg)[0].row()  # a built-in task's row never had it


@pytest.mark.parametrize("frozen_a", [False, True])
def test_finetune_routes_task_rows_and_gives_each_parameter_its_rate(tmp_path, frozen_a):
    """finetune on examples with a task column trains that task's own factors (and the shared ones); lr_of sets a
    parameter's rate (0 leaves it as it was)."""
    from test_llm_models import tiny_llm_folder
    from tying.integrations import transformers as tx
    from tying.integrations.llm.finetune import finetune
    from tying.integrations.llm.models import load_model
    model, tok = load_model(str(tiny_llm_folder(tmp_path / "m")), dtype="float32", device="cpu")
    tying.apply_(model, tx.spec(model, "tl6", rank=4, tasks=["a", "b"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = [{"prompt": f"q{i}", "answer": f"a{i}", "task": "a"} for i in range(8)]
    finetune(model, examples, tok, steps=2, lr=0.05, batch_size=4, progress=False,
             lr_of=(lambda n: 0.0 if n.startswith("tying_bank.u") and n.endswith("#a") else 0.05) if frozen_a else None)
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.startswith("tying_bank.A") for n in moved)  # shared: trained by task a's rows
    assert not any(n.endswith("#b") for n in moved)  # no row of task b: its copies get no gradient
    assert any(n.startswith("tying_bank.v") and n.endswith("#a") for n in moved)
    assert any(n.startswith("tying_bank.u") and n.endswith("#a") for n in moved) != frozen_a  # rate 0: as it was
