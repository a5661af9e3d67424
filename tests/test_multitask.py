"""Multi-task adapters: ``tasks: [...]`` and ``task`` as a tie axis (tying.route, tying.task_files, docs/multitask.md)."""

import copy

import pytest
import torch
from conftest import randomize_bank, same_state, snapshot, tiny_llama
from torch import nn

import tying
from tying.errors import AdapterFileError, AlreadyAppliedError, NotMergeableError, ServingError, SpecError

CONTRACT = {  # the spec, as written
    "tasks": ["a", "b", "c"],
    "targets": [{"select": "model.layers.{layer:#}.self_attn.{proj:q_proj|k_proj|v_proj}"}],
    "adapter": {"rank": 4, "factors": {
        "A": {"tie": ["layer", "proj", "task"], "init": {"kind": "kaiming_uniform", "seed": 0}},
        "B": {"tie": ["layer", "task"], "init": {"kind": "normal", "std": 0.02, "seed": 1}},
        "u": {"tie": ["proj"], "init": "ones"},
        "v": {"tie": [], "init": "ones"}}},
}
NAMES = ["a", "c", "b", "a"]


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d // 2), nn.Linear(d, d // 2)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)[..., : x.shape[-1]] + x


class Net(nn.Module):
    """torch-only: the core suite runs these without transformers."""

    def __init__(self, d=16, layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def spec(**over):
    s = copy.deepcopy(CONTRACT)
    s["targets"] = [{"select": "layers.{layer:#}.{proj:q|k|v}"}]
    s.update(over)
    return s


def applied(s=None, seed=1):
    m = Net()
    tying.apply_(m, s or spec())
    randomize_bank(m, seed)
    return m


# ---- the contract, on a tiny random Llama (2 layers) ------------------------------------------------------------

def test_contract_counts_logits_and_gradients(tmp_path):
    model = tiny_llama(layers=2)
    counts = tying.apply_(model, CONTRACT)
    L, r, T, d_q, d_kv, d_in = 2, 4, 3, 32, 16, 32
    outs = d_q + 2 * d_kv
    # A once; B once per projection; u per layer and task; v per module and task
    assert counts.trainable == r * d_in + r * outs + L * T * r + L * T * outs
    assert counts.per_task == L * r + L * outs and counts.tasks == T
    randomize_bank(model)
    tying.save_adapter(model, tmp_path)
    ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(0))
    with tying.adapters(model, NAMES):
        logits = model(ids).logits
    for i, name in enumerate(NAMES):
        fresh = tiny_llama(layers=2)
        tying.load_adapter(fresh, tmp_path, task=name)
        assert not fresh.tying_bank.spec.tasks
        torch.testing.assert_close(fresh(ids[i:i + 1]).logits[0], logits[i], atol=1e-5, rtol=0)
    A = model.tying_bank["A"]["model:layers:*:self_attn:*"]

    def loss(out):  # a different loss per row, so that the rows' gradients differ
        return (out.logits.pow(2).mean(dim=(1, 2)) * torch.arange(1.0, out.logits.shape[0] + 1)).sum()

    model.zero_grad()
    with tying.adapters(model, NAMES):
        loss(model(ids)).backward()
    mixed = A.grad.clone()
    total = torch.zeros_like(A)
    for task in "abc":  # the three single-task gradients: each task's rows, alone
        rows = [i for i, n in enumerate(NAMES) if n == task]
        model.zero_grad()
        with tying.adapters(model, task):
            out = model(ids[rows]).logits
            (out.pow(2).mean(dim=(1, 2)) * torch.tensor([i + 1.0 for i in rows])).sum().backward()
        total += A.grad
    assert mixed.abs().max() > 1e-4
    torch.testing.assert_close(mixed, total, atol=1e-5, rtol=0)


# ---- spec, plan, counts -----------------------------------------------------------------------------------------

def test_keys_and_counts_follow_the_task_axis():
    p = tying.plan(Net(), tying.load_spec(spec()))
    keys = [f"{g.factor}.{g.key}" for g in p.groups]
    assert keys.count("A.layers:*:*") == 1  # tied across layers, projections and tasks: one copy
    assert {k for k in keys if k.startswith("u.")} == {f"u.layers:{i}:*#{t}" for i in (0, 1) for t in "abc"}
    assert p.counts.per_task == sum(g.numel for g in p.groups if g.key.endswith("#b"))
    assert "one more task adds" in p.summary()
    buckets = spec()
    buckets["adapter"]["factors"]["v"]["tie"] = [{"capture": "task", "groups": [["a", "b"], ["c"]]}]
    p2 = tying.plan(Net(), tying.load_spec(buckets))
    assert {g.key.partition("#")[2] for g in p2.groups if g.factor == "v"} == {"[a,b]", "[c]"}
    every = spec(tasks=["a", "b", "c", "d"])
    every["adapter"]["factors"]["u"]["tie"] = ["proj", {"capture": "task", "every": 2}]
    p3 = tying.plan(Net(), tying.load_spec(every))
    assert {g.key.partition("#")[2] for g in p3.groups if g.factor == "u"} == {"[0-1]", "[2-3]"}
    single = tying.load_spec(spec()).single_task()
    assert single.tasks is None and [a.capture for a in single.adapter.factors["A"].tie] == ["layer", "proj"]


@pytest.mark.parametrize("bad, words", [
    (spec(tasks=["a", "b", "a"]), "written twice"),
    ({k: v for k, v in spec().items() if k != "tasks"}, "has no tasks"),
    (spec(tasks=["a b"]), "tasks"),
    (spec(tasks=[]), "tasks"),
])
def test_bad_specs(bad, words):
    with pytest.raises(SpecError, match=words):
        tying.load_spec(bad)


def test_task_groups_must_cover_the_tasks():
    s = spec()
    s["adapter"]["factors"]["v"]["tie"] = [{"capture": "task", "groups": [["a", "b"], ["x"]]}]
    with pytest.raises(SpecError, match=r"unknown tasks \['x'\], tasks in no group \['c'\]"):
        tying.load_spec(s)


# ---- routing ----------------------------------------------------------------------------------------------------

def test_one_name_routes_the_whole_batch_and_rows_match_their_task():
    m = applied()
    x = torch.randn(4, 3, 16)
    with tying.adapters(m, NAMES):
        mixed = m(x)
    for i, n in enumerate(NAMES):
        with tying.adapters(m, n):
            torch.testing.assert_close(m(x[i:i + 1])[0], mixed[i], atol=1e-6, rtol=0)
    with tying.adapters(m, "b"), tying.adapters(m, "a"):  # blocks nest: the inner one routes
        inner = m(x)
    with tying.adapters(m, "a"):
        torch.testing.assert_close(inner, m(x))


def test_each_task_factor_gets_its_own_rows_gradient_and_shared_ones_the_sum():
    m = applied()
    x = torch.randn(4, 3, 16)
    with tying.adapters(m, NAMES):
        m(x).pow(2).sum().backward()
    bank = m.tying_bank
    assert all(bank["u"][f"layers:0:*#{t}"].grad.abs().sum() > 0 for t in "abc")
    m2 = applied()
    with tying.adapters(m2, "b"):
        m2(x[2:3]).pow(2).sum().backward()  # row 2 is the only b row
    torch.testing.assert_close(bank["u"]["layers:0:*#b"].grad, m2.tying_bank["u"]["layers:0:*#b"].grad)
    assert m2.tying_bank["u"]["layers:0:*#a"].grad is None


def test_forward_without_a_task_and_bad_rows_are_clear_errors():
    m = applied()
    x = torch.randn(3, 2, 16)
    with pytest.raises(ServingError, match=r"name each row's task"):
        m(x)
    snap = snapshot(m)
    with pytest.raises(ServingError, match=r"row 1 names 'z'.*tasks: a, b, c"), tying.adapters(m, ["a", "z", "b"]):
        pass
    with pytest.raises(ServingError, match="3 rows but tying.adapters was given 2"), tying.adapters(m, ["a", "b"]):
        m(x)
    with pytest.raises(ServingError, match="task name"), tying.adapters(m, []):
        pass
    assert same_state(m, snap) and tying.route.current(m.tying_bank) is None  # nothing stays routed


def test_a_kind_without_row_routing_takes_one_task_per_batch():
    s = {"tasks": ["a", "b"], "targets": [{"select": "layers.{layer:#}.{proj:q|k|v}"}],
         "adapter": {"kind": "dora", "rank": 2, "factors": {
             "A": {"tie": ["layer", "task"], "init": {"kind": "kaiming_uniform", "seed": 0}},
             "B": {"tie": ["layer", "task"], "init": "zeros"}, "m": {"tie": [], "init": "ones"}}}}
    m = Net()
    tying.apply_(m, s)
    x = torch.randn(2, 3, 16)
    with tying.adapters(m, "a"):
        m(x)
    with pytest.raises(ServingError, match="cannot mix tasks or adapters row by row"), tying.adapters(m, ["a", "b"]):
        pass


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


@pytest.mark.parametrize("net, select, shape", [(Net, "layers.{layer:#}.{proj:q|k|v}", (4, 3, 16)),
                                                (Convs, "layers.{layer:#}", (4, 3, 5, 5))])
def test_ia3_mixes_tasks_row_by_row(net, select, shape):
    """IA3 across tasks (v per task, u shared where the module type has it): each row of a mixed batch equals that
    row alone on its task, on Linear and on Conv2d; v of each task gets the gradient of its own rows only."""
    factors = {"v": {"tie": [], "init": "ones"}}
    if net is Net:
        factors["u"] = {"tie": ["task"], "init": "ones"}
    m = net()
    tying.apply_(m, {"tasks": ["a", "b", "c"], "targets": [{"select": select}],
                     "adapter": {"kind": "ia3", "rank": 1, "factors": factors}})
    randomize_bank(m, 3)
    x = torch.randn(*shape)
    with tying.adapters(m, NAMES):
        mixed = m(x)
    with tying.adapters(m, "c"):  # row 0 is a's: task c gives another output
        assert not torch.allclose(m(x[:1])[0], mixed[0], atol=1e-3)
    for i, n in enumerate(NAMES):
        with tying.adapters(m, n):
            torch.testing.assert_close(m(x[i:i + 1])[0], mixed[i], atol=1e-6, rtol=0)
    with tying.adapters(m, NAMES):
        m(x).pow(2).sum().backward()
    want = {}
    for t in "abc":
        m.zero_grad()
        with tying.adapters(m, t):
            m(x[[i for i, n in enumerate(NAMES) if n == t]]).pow(2).sum().backward()
        want.update({k: p.grad.clone() for k, p in m.tying_bank.named_parameters() if k.endswith(f"#{t}")})
    m2 = net()
    tying.apply_(m2, m.tying_bank.spec)
    m2.tying_bank.load_state_dict(m.tying_bank.state_dict())
    with tying.adapters(m2, NAMES):
        m2(x).pow(2).sum().backward()
    for k, g in want.items():
        torch.testing.assert_close(dict(m2.tying_bank.named_parameters())[k].grad, g, atol=1e-5, rtol=1e-5)


def test_a_single_task_adapter_refuses_task_routing():
    m = Net()
    tying.apply_(m, tying.load_spec(spec()).single_task())
    with pytest.raises(ServingError, match="has no tasks"), tying.adapters(m, ["a"]):
        pass


# ---- files ------------------------------------------------------------------------------------------------------

def test_save_writes_shared_factors_once_and_loads_whole_or_per_task(tmp_path):
    from safetensors import safe_open

    m = applied()
    tying.save_adapter(m, tmp_path)
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if k.startswith("A.")] == ["A.layers:*:*"]
    assert len([k for k in keys if k.startswith("u.")]) == 2 * 3
    whole = Net()
    tying.load_adapter(whole, tmp_path)
    assert whole.tying_bank.spec.tasks == ["a", "b", "c"] and same_state(whole, snapshot(m))
    x = torch.randn(4, 3, 16)
    with tying.adapters(m, NAMES), tying.adapters(whole, NAMES):
        torch.testing.assert_close(whole(x), m(x))
    plain = Net()
    tying.load_adapter(plain, tmp_path, task="c")
    with tying.adapters(m, "c"):
        torch.testing.assert_close(plain(x), m(x))


def test_export_peft_writes_one_task_and_refuses_to_guess_which(tmp_path):
    """export_peft of a multi-task adapter (applied, or a folder) needs task=: the export of task b equals the export
    of the plain adapter load_adapter(task="b") gives; without a task, or with an unknown one, nothing is written."""
    from safetensors.torch import load_file
    from tying.integrations.peft import export_peft

    m = applied()
    tying.save_adapter(m, tmp_path / "multi")
    plain = Net()
    tying.load_adapter(plain, tmp_path / "multi", task="b")
    want = load_file(str(export_peft(plain, tmp_path / "plain") / "adapter_model.safetensors"))
    for src in (None, tmp_path / "multi"):  # the applied adapter, and the folder planned on a bare model
        model = m if src is None else Net()
        for task, words in ((None, r"tasks: a, b, c\); a PEFT LoRA holds one task: export_peft\(.*task="),
                            ("z", "no task 'z'; its tasks: a, b, c")):
            with pytest.raises(AdapterFileError, match=words):
                export_peft(model, tmp_path / "refused", adapter=src, task=task)
            assert not (tmp_path / "refused").exists()
        got = load_file(str(export_peft(model, tmp_path / "b", adapter=src, task="b") / "adapter_model.safetensors"))
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(AdapterFileError, match="single-task adapter; leave out task="):
        export_peft(plain, tmp_path / "refused", task="b")


def test_train_modules_are_one_copy_shared_by_every_task(tmp_path):
    m = applied(spec(train_modules=["head"]))
    with torch.no_grad():
        m.head.trained.weight.add_(1.0)  # the adapter's copy of the module it trains whole
    tying.save_adapter(m, tmp_path)
    x = torch.randn(2, 3, 16)
    for task in (None, "b"):
        fresh = Net()
        with pytest.raises(AdapterFileError, match="would replace base modules"):
            tying.load_adapter(fresh, tmp_path, task=task)
        tying.load_adapter(fresh, tmp_path, task=task, replace_modules=True)
        torch.testing.assert_close(fresh.head.trained.weight, m.head.trained.weight)
        assert torch.equal(fresh.head.weight, Net().head.weight)  # the base module keeps its values
        with tying.adapters(m, "b"), (tying.adapters(fresh, "b") if task is None else torch.no_grad()):
            torch.testing.assert_close(fresh(x), m(x))


def test_bad_task_loads_change_nothing(tmp_path):
    m = applied()
    tying.save_adapter(m, tmp_path / "multi")
    single = Net()
    tying.apply_(single, tying.load_spec(spec()).single_task())
    tying.save_adapter(single, tmp_path / "single")
    fresh = Net()
    snap = snapshot(fresh)
    with pytest.raises(AdapterFileError, match=r"no task 'z'; its tasks: a, b, c"):
        tying.load_adapter(fresh, tmp_path / "multi", task="z")
    with pytest.raises(AdapterFileError, match="single-task adapter; leave out task="):
        tying.load_adapter(fresh, tmp_path / "single", task="a")
    assert not hasattr(fresh, "tying_bank") and same_state(fresh, snap)
    with pytest.raises(AlreadyAppliedError, match=r"holds tasks \['a', 'b', 'c'\]: load one of them with task="):
        tying.load_adapter(single, tmp_path / "multi")


def test_load_of_a_tampered_multi_task_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    m = applied()
    tying.save_adapter(m, tmp_path)
    path = tmp_path / "adapter.safetensors"
    tensors = load_file(path)
    tensors.pop("u.layers:1:*#c")  # another task's factor: loading task a alone must still refuse the file
    meta = {"format": "tying", "version": "2", "tying_spec": (tmp_path / "spec.yaml").read_text()}
    save_file(tensors, path, metadata=meta)
    with pytest.raises(AdapterFileError, match=r"missing factors \['u.layers:1:\*#c'\]"):
        tying.load_adapter(Net(), tmp_path, task="a")


# ---- merge ------------------------------------------------------------------------------------------------------

def test_merge_one_task_and_refusals():
    m = applied()
    x = torch.randn(2, 3, 16)
    snap = snapshot(m)
    with pytest.raises(NotMergeableError, match="say which task's update to fold in: pass task= 'a', 'b', 'c'"):
        tying.merge_(m)
    with pytest.raises(NotMergeableError, match="unknown task 'q'"):
        tying.merge_(m, task="q")
    assert same_state(m, snap)
    with tying.adapters(m, "b"):
        want = m(x)
    tying.merge_(m, task="b")
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=0)  # merged: no routing needed
    with pytest.raises(NotMergeableError, match="task 'b' is merged"), tying.adapters(m, "a"):
        pass
    with pytest.raises(NotMergeableError, match="task 'b' is merged already"):
        tying.merge_(m, task="a")
    tying.unmerge_(m)
    for k, v in m.state_dict().items():  # the base weights as before, up to rounding
        torch.testing.assert_close(v, snap[k], atol=1e-6, rtol=0)
    with tying.adapters(m, "b"):
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=0)
    tying.unapply_(m)  # nothing merged: no task needed
    with pytest.raises(NotMergeableError, match="pass task="):
        tying.unapply_(applied(), merge=True)


def test_a_checkpoint_taken_while_one_task_is_merged_records_which():
    """A state_dict taken while task b is merged, loaded into a fresh adapted model, knows b is merged: routing
    to another task is refused (it used to give b's output silently) and unmerge_ takes b out."""
    m = applied()
    x = torch.randn(2, 3, 16)
    with tying.adapters(m, "b"):
        want_b = m(x)
    with tying.adapters(m, "a"):
        want_a = m(x)
    tying.merge_(m, task="b")
    f = applied(seed=7)
    f.load_state_dict(m.state_dict())
    with pytest.raises(NotMergeableError, match="task 'b' is merged"), tying.adapters(f, "a"):
        pass
    with pytest.raises(NotMergeableError, match="task 'b' is merged already"):
        tying.merge_(f, task="a")
    tying.unmerge_(f)
    with tying.adapters(f, "a"):
        torch.testing.assert_close(f(x), want_a, atol=1e-5, rtol=0)
    with tying.adapters(f, "b"):
        torch.testing.assert_close(f(x), want_b, atol=1e-5, rtol=0)
    h = applied(spec(tasks=["c", "b", "a"]), seed=7)  # the task is recorded by name, not by its place in the list
    h.load_state_dict(m.state_dict())
    with pytest.raises(NotMergeableError, match="task 'b' is merged"), tying.adapters(h, "a"):
        pass
    tying.unmerge_(h)
    with tying.adapters(h, "a"):
        torch.testing.assert_close(h(x), want_a, atol=1e-5, rtol=0)
    unknown = m.state_dict()  # a record of merged sites that does not say which task
    del unknown["tying_bank.merged_task"]
    g = applied(seed=7)
    g.load_state_dict(unknown)
    snap = snapshot(g)
    with pytest.raises(NotMergeableError, match="does not say which task"), tying.adapters(g, "a"):
        pass
    with pytest.raises(NotMergeableError, match="does not say which task"):
        tying.unmerge_(g)
    assert same_state(g, snap)


# ---- serving ----------------------------------------------------------------------------------------------------

def test_serving_a_multi_task_folder_stores_shared_factors_once(tmp_path):
    m = applied()
    tying.save_adapter(m, tmp_path)
    served = Net()
    tying.load_adapters_(served, {"m": tmp_path})
    assert tying.serving.served(served) == ["m/a", "m/b", "m/c"]
    bank = served.tying_serving
    assert bank.stack("A16").shape[0] == 1  # one A for the three tasks (trained, yet shared)
    assert bank.stack("u").shape[0] == 1 + 2 * 3  # the neutral entry + per layer and task
    x = torch.randn(4, 3, 16)
    with tying.adapters(served, ["m/" + n for n in NAMES]):
        got = served(x)
    with torch.no_grad(), tying.adapters(m, NAMES):
        torch.testing.assert_close(got, m(x), atol=1e-5, rtol=0)
    tying.unload_adapter_(served, "m/a")
    with tying.adapters(served, ["m/c", None]):
        got = served(x[:2])
    with torch.no_grad(), tying.adapters(m, "c"):
        torch.testing.assert_close(got[0], m(x[:1])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], Net()(x[1]), atol=1e-6, rtol=0)


# ---- presets made multi-task, the command line, the Trainer ------------------------------------------------------

def test_a_preset_made_multi_task_shares_what_it_shares_across_layers():
    s = tying.load_spec("tl6", tasks=["x", "y"])
    ties = {k: [a.capture for a in f.tie] for k, f in s.adapter.factors.items()}
    assert ties == {"A": ["layer", "proj", "task"], "B": ["layer", "task"], "u": ["proj"], "v": []}
    assert tying.load_spec("lora", tasks=["x"]).adapter.factors["A"].tie[0].capture == "proj"


def test_count_on_the_command_line_gives_the_cost_of_one_more_task(capsys):
    pytest.importorskip("transformers")
    from tying.cli import main

    assert main(["count", "--model", "llama2-7b", "--spec", "tl6", "--tasks", "5", "--json"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    L, d, r = 32, 4096, 8
    assert out["per_task"] == L * (r + 3 * d) and out["tasks"] == 5
    assert out["trainable"] == 4 * d * r + 5 * L * (r + 3 * d)  # A and B once (the paper's TL5 count), u, v x 5


def test_trainer_needs_the_task_column(tmp_path):
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from tying.integrations.transformers import TyingTrainer

    model = tiny_llama(layers=2)
    tying.apply_(model, CONTRACT)
    ids = [[1, 2, 3, 4]] * 4
    args = transformers.TrainingArguments(str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True,
                                          per_device_train_batch_size=2, save_strategy="no")
    snap = snapshot(model)
    trainer = TyingTrainer(model=model, args=args,
                           train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}))
    with pytest.raises(ServingError, match="needs each example's task"):
        trainer.train()
    assert same_state(model, snap)
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "task": [0, 2, 1, 0]})
    TyingTrainer(model=model, args=args, train_dataset=data).train()  # positions in `tasks` (names: test_distributed)
    assert not same_state(model, snap)

    class OwnLoss(TyingTrainer):  # a subclass with its own loss (the LLM kit's AnswerTrainer) is routed too
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss

    snap = snapshot(model)
    OwnLoss(model=model, args=args, train_dataset=data).train()
    assert not same_state(model, snap)


def test_a_multi_task_spec_through_peft_get_peft_model(tmp_path):
    """TyingConfig with tasks: PEFT saves every task (shared factors once) and loads them back; rows are routed on
    the inner model (``peft_model.base_model.model``)."""
    peft = pytest.importorskip("peft")
    from tying.integrations.peft import TyingConfig

    m = peft.get_peft_model(tiny_llama(layers=2), TyingConfig(spec=copy.deepcopy(CONTRACT)))
    randomize_bank(m.base_model.model)
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tying.adapters(m.base_model.model, ["a", "b", "c"]):
        want = m(input_ids=ids).logits
    m.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(tiny_llama(layers=2), tmp_path)
    with torch.no_grad(), tying.adapters(fresh.base_model.model, ["a", "b", "c"]):
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_the_merge_record_reads_back_from_a_checkpoint_file(tmp_path):
    """Issue 39.4: the bank's typed state says what is merged, and a checkpoint's record reads back without a model
    (from a state dict, a torch.save file and a safetensors file, also under a PEFT-like key prefix)."""
    from safetensors.torch import save_file

    model = tiny_llama(layers=2)
    tying.apply_(model, tying.load_spec("tl6", rank=4, tasks=["a", "b"]))
    n = len(tying.bank_of(model).plan.sites)
    assert tying.merge_record(model.state_dict()) == tying.MergeRecord(flags=(False,) * n, task=None)
    tying.merge_(model, task="b")
    state = tying.bank_of(model).state
    assert isinstance(state, tying.BankState) and state.merged and state.merged_task == "b"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    want = tying.MergeRecord(flags=(True,) * n, task="b")
    torch.save(sd, tmp_path / "ckpt.pt")
    save_file({f"base_model.model.{k}": v for k, v in sd.items()}, tmp_path / "ckpt.safetensors")
    assert tying.merge_record(sd) == want == tying.merge_record(tmp_path / "ckpt.pt")
    assert tying.merge_record(tmp_path / "ckpt.safetensors") == want
    shards = tmp_path / "pretrained"  # a save_pretrained folder of two shards, the record in the second
    shards.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys if "tying_bank" not in k}, shards / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys if "tying_bank" in k}, shards / "model-00002-of-00002.safetensors")
    assert tying.merge_record(shards) == want
    assert tying.merge_record(sd, name="other") is None  # no record of that adapter
    assert tying.merge_record(tiny_llama(layers=2).state_dict()) is None  # a plain base checkpoint
    with pytest.raises(AdapterFileError, match="no such checkpoint"):
        tying.merge_record(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="nor a folder"):
        tying.merge_record(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(AdapterFileError, match="not a readable checkpoint"):
        tying.merge_record(tmp_path / "bad.safetensors")


def test_a_bank_pickled_before_its_typed_state_unpickles_with_its_state():
    """A whole model torch.save'd by an earlier tying (the bank's state as its own attributes) loads with that state
    in bank.state: a merged task stays merged, the base's requires_grad flags stay restorable."""
    import pickle

    model = tiny_llama(layers=2)
    tying.apply_(model, tying.load_spec("tl6", rank=4, tasks=["a", "b"]))
    tying.merge_(model, task="a")
    bank = tying.bank_of(model)
    state = bank.__dict__.pop("state")
    bank.__dict__.update(active=state.active, merged=state.merged, merged_task=state.merged_task,
                         merged_unknown=False, unmixable=state.unmixable, hooks=state.hooks,
                         requires_grad_before=state.requires_grad_before, pending=({}, None), unset=None)
    again = pickle.loads(pickle.dumps(model))
    got = tying.bank_of(again).state
    assert got.merged and got.merged_task == "a" and got.requires_grad_before == state.requires_grad_before
    assert not {"active", "merged", "merged_task", "pending"} & set(tying.bank_of(again).__dict__)
