"""The route belongs to the call (issue 35, item 1): blocks leave innermost first, nothing stays routed, threads that
serve one model each get their own rows; named adapters on one model, routed row by row with exact gradients."""

import threading

import pytest
import torch
from conftest import randomize_bank
from torch import nn

import tying
from tying.errors import ServingError


class Net(nn.Module):
    """torch-only (the core suite runs it without transformers)."""

    def __init__(self, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


LORA = {"targets": [{"select": "layers.{layer:#}"}],
        "adapter": {"rank": 2, "factors": {"A": {"init": "kaiming_uniform"}, "B": {"init": "zeros"}}}}


def served(tmp_path, n=2):
    """A Net serving adapters a0..a{n-1} (random factors), and each adapter's reference model."""
    refs = {}
    for i in range(n):
        m = Net()
        tying.apply_(m, LORA)
        randomize_bank(m, seed=i + 1)
        tying.save_adapter(m, tmp_path / f"a{i}")
        refs[f"a{i}"] = m
    model = Net()
    tying.load_adapters_(model, {f"a{i}": tmp_path / f"a{i}" for i in range(n)})
    return model, refs


def test_blocks_left_out_of_order_are_refused_and_nothing_stays_routed(tmp_path):
    model, _ = served(tmp_path)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        base = Net()(x)
        first, second = tying.adapters(model, ["a0", None]), tying.adapters(model, [None, "a0"])
        first.__enter__()
        second.__enter__()
        with pytest.raises(ServingError, match="innermost first"):
            first.__exit__(None, None, None)
        second.__exit__(None, None, None)
        assert torch.equal(model(x), base)  # before: the rows stayed adapted (0.034 from the base)


def race(model, x, plans, want) -> list:
    """4 threads x 60 forwards of ``model`` on ``x``, each routed by the next of ``plans``; the rows whose output
    differs from ``want[name][row]`` (any exception fails the test)."""
    wrong, errors = [], []

    def run(k):
        try:
            for i in range(60):
                names = plans[(k + i) % len(plans)]
                with torch.no_grad(), tying.adapters(model, names):
                    out = model(x)
                wrong.extend((k, i, r) for r, n in enumerate(names) if not torch.allclose(out[r], want[n][r], atol=1e-6))
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    return wrong


def test_two_threads_serving_one_model_each_get_their_own_rows(tmp_path):
    model, refs = served(tmp_path, 3)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        want = {n: r(x) for n, r in refs.items()} | {None: Net()(x)}
    plans = [["a0", "a1"], ["a2", None], [None, "a0"], ["a1", "a2"]]
    assert not race(model, x, plans, want)  # before: 14 % of forwards wrong, no error
    with torch.no_grad():
        assert torch.equal(model(x), want[None])


def test_two_threads_routing_one_multi_task_model():
    model = Net()
    tying.apply_(model, {**LORA, "tasks": ["p", "q"]})
    randomize_bank(model)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        want = {}
        for t in ("p", "q"):
            with tying.adapters(model, t):
                want[t] = model(x)
    assert not race(model, x, [["p", "q"], ["q", "p"], ["q", "q"]], want)  # before: 22 % wrong plus spurious errors


def test_named_adapters_mix_rows_with_each_adapter_s_own_gradients():
    x = torch.randn(3, 5, 16)
    model = Net()
    tying.apply_(model, LORA, name="a")
    tying.apply_(model, {**LORA, "train_modules": ["head"]}, name="b")  # b also trains the head whole
    for seed, name in ((1, "a"), (2, "b")):
        randomize_bank(tying.bank_of(model, name), seed=seed)
    refs = {}
    for seed, name, spec in ((1, "a", LORA), (2, "b", {**LORA, "train_modules": ["head"]})):
        ref = Net()
        tying.apply_(ref, spec)
        randomize_bank(ref, seed=seed)
        refs[name] = ref
    names = ["b", None, "a"]
    with tying.adapters(model, names):
        out = model(x)
    out.square().sum().backward()
    base = Net()
    for row, name in enumerate(names):
        ref = base if name is None else refs[name]
        y = ref(x[row:row + 1])
        assert torch.allclose(out[row], y[0], atol=1e-6)
        if name is not None:
            y.square().sum().backward()
            for (k, p), (_, q) in zip(tying.bank_of(model, name).named_parameters(),
                                      tying.bank_of(ref).named_parameters()):
                assert torch.allclose(p.grad, q.grad, atol=1e-6), (name, k)  # its own rows only
    with torch.no_grad():  # no route: both adapters apply; b's head copy answers the head
        both = model(x)
        with tying.adapters_disabled(model):
            assert torch.equal(model(x), base(x))
    assert not torch.allclose(both, base(x))


def test_named_adapters_are_saved_one_by_one_and_taken_out_in_any_order(tmp_path):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tying.apply_(model, LORA, name="a")
    tying.apply_(model, LORA, name="b")
    randomize_bank(tying.bank_of(model, "a"), seed=1)
    with pytest.raises(tying.errors.TyingError, match="several adapters"):
        tying.save_adapter(model, tmp_path / "x")
    tying.save_adapter(model, tmp_path / "a", name="a")
    alone = Net()
    tying.load_adapter(alone, tmp_path / "a")
    x = torch.randn(2, 16)
    with torch.no_grad(), tying.adapters(model, ["a", "a"]):
        assert torch.allclose(model(x), alone(x), atol=1e-6)
    tying.unapply_(model, name="a")  # the inner one first: b's wrappers now wrap the base modules
    assert list(tying.engine.banks(model)) == ["b"]
    tying.unapply_(model, name="b")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_merged_adapter_cannot_be_routed_away_from_any_row():
    model = Net()
    tying.apply_(model, LORA, name="a")
    tying.apply_(model, LORA, name="b")
    randomize_bank(tying.bank_of(model, "a"), seed=1)
    tying.merge_(model, name="a")
    with pytest.raises(tying.errors.NotMergeableError, match="adapter 'a' is merged"), tying.adapters(model, ["b"]):
        pass  # the rows would still get a's update: it is in the weights
    with pytest.raises(tying.errors.NotMergeableError, match="cannot be disabled"), tying.adapters_disabled(model):
        pass


def test_load_adapters_trainable_trains_each_on_its_rows_and_saves_one_by_one(tmp_path):
    refs = {}
    for i, spec in enumerate((LORA, {**LORA, "targets": [{"select": "layers.1"}]})):  # other modules: allowed
        m = Net()
        tying.apply_(m, spec)
        randomize_bank(m, seed=i + 1)
        tying.save_adapter(m, tmp_path / f"a{i}")
        refs[f"a{i}"] = m
    model = Net()
    tying.load_adapters_(model, {"a0": tmp_path / "a0", "a1": tmp_path / "a1"}, trainable=True)
    x = torch.randn(2, 5, 16)
    with tying.adapters(model, ["a1", "a0"]):
        model(x).square().sum().backward()
    for row, name in enumerate(["a1", "a0"]):
        refs[name](x[row:row + 1]).square().sum().backward()
        for (k, p), (_, q) in zip(tying.bank_of(model, name).named_parameters(),
                                  tying.bank_of(refs[name]).named_parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5), (name, k)
    tying.save_adapter(model, tmp_path / "out", name="a1")  # an ordinary folder
    again = Net()
    tying.load_adapter(again, tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(again(x), refs["a1"](x), atol=1e-6)
    broken = tmp_path / "broken"
    broken.mkdir()
    fresh = Net()
    with pytest.raises(tying.errors.AdapterFileError, match="'b'"):
        tying.load_adapters_(fresh, {"a0": tmp_path / "a0", "b": broken}, trainable=True)
    assert not tying.engine.banks(fresh)  # a0 was taken off again


def test_loaded_adapters_and_the_tasks_of_a_multi_task_one_mix_in_one_batch_and_train(tmp_path):
    """Issue 39.1: adapters loaded with load_adapters_(trainable=True), one of them multi-task, mix row by row in one
    batch: each row gets exactly its adapter's (and task's) output, and each task's own factors get only its rows'
    gradients (a task named by no row gets none)."""
    multi = {**LORA, "tasks": ["x", "y", "z"]}  # every factor one copy per task
    for name, spec, seed in (("a", LORA, 1), ("m", multi, 2)):
        m = Net()
        tying.apply_(m, spec)
        randomize_bank(m, seed=seed)
        tying.save_adapter(m, tmp_path / name)
    model = Net()
    tying.load_adapters_(model, {"a": tmp_path / "a", "m": tmp_path / "m"}, trainable=True)
    names = ["m/y", "a", None, "m/x"]
    x = torch.randn(len(names), 5, 16)
    with tying.adapters(model, names):
        mixed = model(x)
        mixed.square().sum().backward()
    for row, name in enumerate(names):
        alone = Net()
        if name is not None:
            tying.load_adapter(alone, tmp_path / name.partition("/")[0])
        with torch.no_grad(), (tying.adapters(alone, name.partition("/")[2]) if name and "/" in name
                               else torch.enable_grad()):
            assert torch.allclose(mixed[row], alone(x[row:row + 1])[0], atol=1e-5), name
    grads = {k: p.grad for k, p in tying.bank_of(model, "m").named_parameters() if "#" in k}
    assert grads and all(g is None or not g.any() for k, g in grads.items() if k.endswith("#z"))
    assert all(g is not None and g.any() for k, g in grads.items() if k.endswith(("#x", "#y")))
