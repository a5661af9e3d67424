"""benchmarks/llm_tasks.py on a tiny local model: the LLM tasks trained jointly (one TL6 across tasks, mixed
batches, per-task rates) against separate runs of reproduce.py, reported with intervals; a finished seed is kept."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import torch
import yaml

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
    from tying.integrations.llm import parts
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
