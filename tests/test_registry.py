"""The open core: kind and module-type registries, the torch-free vocabulary, and the layering they allow."""

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import tying
from tying import modtypes, vocab
from tying.errors import RegistryError
from tying.site import SiteAdapter

CORE = Path(tying.__file__).parent


def _tying_imports(path: Path) -> set[str]:
    """Modules of the tying package that ``path`` imports (relative or absolute)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = node.module or ""
                out |= {base} if base else {a.name for a in node.names}
            elif node.module and node.module.startswith("tying"):
                out.add(node.module.removeprefix("tying").lstrip(".") or "tying")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tying")}
    return out


def test_contract_spec_imports_only_vocab_selectors_errors():
    assert _tying_imports(CORE / "spec.py") <= {"vocab", "selectors", "errors", "presets.families"}
    assert not _tying_imports(CORE / "presets" / "families.py")  # the presets with knobs: data builders, no runtime


def test_vocab_is_torch_free_and_stands_on_errors_only():
    tree = ast.parse((CORE / "vocab.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported
    assert _tying_imports(CORE / "vocab.py") <= {"errors"}


def test_layers_import_one_way_from_the_bottom():
    """vocab -> spec -> the math, module types, the view and the route -> plan -> wrappers and banks -> kinds -> engine
    -> state -> serving: no module
    imports one above it, and the core imports no transformers."""
    order = ["errors", "vocab", "selectors", "spec", "update", "pools", "modtypes", "view", "route", "planner",
             "trained", "bank", "meta", "shared_down", "site", "kinds", "sharded", "tensor_parallel", "merging", "engine", "count", "files", "task_files",
             "state", "serving_bank", "serving"]
    for i, name in enumerate(order):
        path = CORE / (f"{name}.py" if name != "kinds" else "kinds/__init__.py")
        above = set(order[i + 1:]) - {name}
        assert not (_tying_imports(path) & above), (name, _tying_imports(path) & above)
    for path in CORE.rglob("*.py"):  # the command line, a front end, imports the integrations inside its functions
        indent = "" if path.name == "cli.py" else r"\s*"
        assert not re.search(rf"^{indent}(import|from) (transformers|\.+integrations)", path.read_text(), re.MULTILINE), path


def test_no_kind_name_comparisons_outside_the_kinds_own_files():
    names = "|".join(map(re.escape, vocab.kind_names()))
    q = rf"""["']({names})["']"""
    pattern = re.compile(rf"kind\)?\s*(==|!=|not in|in)\s*\(?\s*{q}|{q}\s*(==|!=)\s*[\w.]*kind|{q}\s*:.*\bkind\b")
    for path in [*CORE.rglob("*.py"), *(CORE.parent / "integrations").rglob("*.py")]:
        if path.parent.name == "kinds" and path.name != "__init__.py":
            continue
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, (path, hits)


def test_registering_a_name_that_exists_names_the_holder():
    with pytest.raises(RegistryError, match=r"adapter kind 'lora' is registered already \(by tying\.kinds\.lora\)"):
        tying.register_kind("lora", wrapper=SiteAdapter, factors={"A": ("rank", "d_in")})
    with pytest.raises(RegistryError, match=r"module type 'Linear' is registered already \(by tying\.modtypes\)"):
        tying.register_module_type("Linear", nn.Linear, dims=lambda m: (1, 1))
    assert tying.load_spec("lora").adapter.kind == "lora"  # nothing was replaced


@pytest.mark.parametrize("kwargs, match", [
    ({"factors": {"A": ("rank", "d_in")}}, "missing wrapper"),
    ({"wrapper": SiteAdapter}, "missing factors"),
    ({"wrapper": nn.Linear, "factors": {"A": ("rank", "d_in")}}, "not a tying.site.SiteAdapter subclass"),
    ({"wrapper": SiteAdapter, "factors": {"A": ("rank", "width")}}, r"factor 'A' has shape \('rank', 'width'\)"),
    ({"wrapper": SiteAdapter, "factors": {"A": ("rank", "d_in")}, "required": ("B",)}, "required factor 'B'"),
    ({"wrapper": SiteAdapter, "factors": {"v": ("d_out",)}, "serving": {"v": "A"}}, "serving role 'A' needs shape"),
    ({"wrapper": SiteAdapter, "factors": {"v": ("d_out",)}, "needs": {"wings"}}, "capability 'wings' is unknown"),
    ({"wrapper": SiteAdapter, "factors": {"v": ("d_out",)}, "colour": "red"}, r"unknown facts \['colour'\]"),
])
def test_a_kind_missing_or_malforming_a_fact_is_refused(kwargs, match):
    with pytest.raises(RegistryError, match=match):
        tying.register_kind("broken", **kwargs)
    assert "broken" not in vocab.kind_names()


@pytest.mark.parametrize("kwargs, match", [
    ({}, "dims .* is missing"),
    ({"dims": lambda m: (1, 1), "down": lambda *a: None}, "give down and up together"),
    ({"dims": lambda m: (1, 1), "store": lambda m, w: None}, "store and quantized need weight"),
    ({"dims": lambda m: (1, 1), "weight": lambda m: None, "quantized": True}, "a quantized type needs store"),
    ({"dims": lambda m: (1, 1), "weight": "m.weight"}, "weight is not callable"),
    ({"dims": lambda m: (1, 1), "caps": {"wings": True}}, "unknown capabilities"),
    ({"dims": lambda m: (1, 1), "parent": "Nope"}, "parent 'Nope' is not a registered module type"),
])
def test_a_module_type_missing_or_malforming_a_fact_is_refused(kwargs, match):
    with pytest.raises(RegistryError, match=match):
        tying.register_module_type("Broken", nn.Identity, **{"dims": None, **kwargs})
    assert "Broken" not in vocab.module_type_names()


def test_a_kind_from_outside_is_validated_planned_applied_and_removed():
    class Shift(SiteAdapter):
        shares_down = False

        def forward(self, x):
            return self.base(x) + self.factor("b")

    tying.register_kind("shift_test", wrapper=Shift, factors={"b": ("d_out",)}, required=("b",), rank_limit=(),
                        needs={"out_last"})
    try:
        facts = vocab.kind("shift_test")
        assert not facts.mergeable and facts.serving is None and not facts.exportable
        assert facts.owner == __name__
        net = nn.Module()
        net.a, net.b = nn.Linear(4, 3), nn.Linear(4, 3)
        spec = {"targets": [{"select": "{which:a|b}"}], "adapter": {"kind": "shift_test", "rank": 1, "factors": {
            "b": {"tie": ["which"], "init": {"kind": "constant", "value": 0.5}}}}}
        x = torch.randn(2, 4)
        before = net.a(x)
        assert tying.apply_(net, spec).trainable == 3
        assert torch.allclose(net.a(x), before + 0.5)
        with pytest.raises(tying.errors.NotMergeableError, match="module 'a'.*no merged form"):
            tying.merge_(net)
        with pytest.raises(tying.errors.SpecError, match="needs factors \\['b'\\]"):
            tying.load_spec({**spec, "adapter": {**spec["adapter"], "factors": {}}})
    finally:
        tying.unregister_kind("shift_test")
    with pytest.raises(tying.errors.SpecError, match="unknown adapter kind 'shift_test'"):
        tying.load_spec(spec)


def test_a_module_type_from_outside_is_found_before_its_parent_class_and_selectable_by_parent():
    class Tagged(nn.Linear):
        pass

    mt = tying.register_module_type("TaggedLinear", Tagged, parent="Linear", weight=lambda m: m.weight,
                                    dims=lambda m: (m.in_features, m.out_features), **modtypes.LINEAR_LIKE)
    try:
        assert modtypes.lookup(Tagged(2, 2)) is mt and modtypes.lookup(nn.Linear(2, 2)).name == "Linear"
        net = nn.Module()
        net.t = Tagged(4, 4)
        spec = {"targets": [{"select": "t", "types": ["Linear"]}], "adapter": {"rank": 2, "factors": {
            "A": {"init": {"kind": "normal", "seed": 0}}, "B": {"init": {"kind": "normal", "seed": 1}}}}}
        plan = tying.plan(net, tying.load_spec(spec))
        assert [s.module_type for s in plan.sites] == ["TaggedLinear"]
        tying.apply_(net, spec)
        x = torch.randn(3, 4)
        with torch.no_grad():
            ref = net.t(x)
            tying.merge_(net)
            assert torch.allclose(net.t(x), ref, atol=1e-6)
    finally:
        tying.unregister_module_type("TaggedLinear")
    assert modtypes.lookup(Tagged(2, 2)).name == "Linear"


def test_module_types_pickle_and_copy_by_name():
    import copy
    import pickle

    mt = modtypes.module_type("Linear")
    assert copy.deepcopy(mt) is mt and pickle.loads(pickle.dumps(mt)) is mt


def test_prefix_routes_sdpa_only_while_applied(tokens):
    pytest.importorskip("transformers")
    import copy
    import gc

    from conftest import tiny_llama
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from tying.integrations.transformers import _SDPA

    gc.collect()  # prefix models of earlier tests are gone: their wrappers leave the routing
    others = len(list(_SDPA.users))  # prefix adapters still applied elsewhere in this process
    assert (AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward) == (others == 0)
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    tying.apply_(model, tying.load_spec("prefix", rank=2))
    assert AttentionInterface._global_mapping["sdpa"] is not sdpa_attention_forward
    twin = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    tying.unapply_(model)
    assert (AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward) == (others == 0)
    with torch.no_grad():  # the copy joins again on its first forward and computes the same
        assert torch.allclose(twin(input_ids=tokens).logits, ref, atol=1e-6)
    assert AttentionInterface._global_mapping["sdpa"] is not sdpa_attention_forward
    tying.unapply_(twin)
    assert (AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward) == (others == 0)


def test_sibling_convolutions_do_not_share_a_down_product():
    """Two convolutions of one parent read the same input with one tied A but different strides: each computes
    its own A x (sharing is for Linear-like modules, whose down product depends on the input and factors alone)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, stride=1), nn.Conv2d(2, 3, 3, stride=2)

        def forward(self, x):
            return self.a(x).sum() + self.b(x).sum()

    net = Net()
    spec = {"targets": [{"select": "{which:a|b}"}], "adapter": {"rank": 2, "factors": {
        "A": {"tie": ["which"], "init": {"kind": "normal", "seed": 0}}, "B": {"init": {"kind": "normal", "seed": 1}}}}}
    x = torch.randn(1, 2, 9, 9)
    tying.apply_(net, spec)
    assert net.a.share is None and net.b.share is None
    with torch.no_grad():
        assert torch.allclose(net(x), net.a(x).sum() + net.b(x).sum())


def test_embedding_sites_take_no_input_dropout_and_channels_last_convolutions_merge():
    net = nn.Module()
    net.emb, net.conv = nn.Embedding(10, 4), nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    spec = {"targets": [{"select": "re:emb|conv"}], "adapter": {"rank": 2, "dropout": 0.1, "factors": {
        "A": {"init": {"kind": "normal", "seed": 0}}, "B": {"init": {"kind": "normal", "seed": 1}}}}}
    tying.apply_(net, spec)
    assert net.emb.dropout is None and net.conv.dropout is not None
    net.train()
    assert net.emb(torch.tensor([[1, 2]])).shape == (1, 2, 4)  # token ids are not dropped out
    net.eval()
    x = torch.randn(1, 2, 5, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net.conv(x)
        tying.merge_(net)
        assert torch.allclose(net.conv(x), ref, atol=1e-5)  # the kernel's copy was written back


def test_bridge_names_are_reserved_and_a_class_takes_one_plain_type(monkeypatch):
    monkeypatch.setitem(vocab.BRIDGE_TYPES, "Bridged", "transformers")  # a type transformers' bridge would register
    with pytest.raises(RegistryError, match="'Bridged' is reserved for tying.integrations.transformers"):
        tying.register_module_type("Bridged", nn.Identity, dims=lambda m: (1, 1))
    with pytest.raises(RegistryError, match="Linear has a plain module type already \\('Linear', by tying.modtypes\\)"):
        tying.register_module_type("MyLinear", nn.Linear, dims=lambda m: (1, 1))
    assert "MyLinear" not in vocab.module_type_names()


def test_a_subclass_of_a_bridged_class_loads_the_bridge(tmp_path):
    """A user's subclass of transformers' Conv1D, defined outside transformers, is adapted as Conv1D in a fresh
    process (the bridge is found along the class's MRO)."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    code = ("import tying, torch\nfrom transformers.pytorch_utils import Conv1D\n"
            "class Mine(Conv1D):\n    pass\n"
            "net = torch.nn.Module(); net.c = Mine(6, 4)\n"
            "spec = {'targets': [{'select': 'c', 'types': ['Conv1D']}], 'adapter': {'rank': 2, 'factors': "
            "{'A': {'init': 'kaiming_uniform'}, 'B': {'init': 'zeros'}}}}\n"
            "print([s.module_type for s in tying.plan(net, tying.load_spec(spec)).sites])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("['Conv1D']")


QUIET = """
import sys, torch, tying
from torch import nn

def loaded():  # quantization libraries and their bridge, as imported so far
    return sorted(m for m in sys.modules if m.partition(".")[0] in ("bitsandbytes", "torchao")
                  or m == "tying.integrations.quant")

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.ModuleDict({"self_attn": Attention()}) for _ in range(2))

plain = Plain()
tying.apply_(plain, tying.load_spec("tl6", rank=2))
print("plain", loaded(), flush=True)
try:
    import transformers
except ImportError:
    sys.exit()
cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, vocab_size=100)
llama = transformers.LlamaForCausalLM(cfg).eval()
before = loaded()  # transformers itself imports torchao where it is installed (its quantizer registry)
print("--- apply", flush=True)
print("--- apply", file=sys.stderr, flush=True)
tying.apply_(llama, tying.load_spec("tl6", rank=8))
with torch.no_grad():
    llama(torch.tensor([[1, 2, 3]]))
tying.merge_(llama)
tying.unapply_(llama)
print("llama", sorted(set(loaded()) - set(before)), flush=True)
"""


def test_a_plain_model_imports_no_quantization_library():
    """The quantization bridge (and bitsandbytes or torchao through it) loads only when the planner meets a module or
    weight of those libraries: a plain model imports none of them, and applying tl6 to a plain transformers Llama
    imports none of them and prints nothing (transformers itself may import torchao; that is before the apply)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("plain []\n"), out.stdout[:1000]
    if "--- apply" in out.stdout:
        assert out.stdout.partition("--- apply\n")[2] == "llama []\n", out.stdout[-1000:]
        assert out.stderr.partition("--- apply\n")[2] == "", out.stderr[-1000:]


def test_the_llm_kit_imports_one_way():
    """No import circle among the LLM kit's modules, counting imports inside functions too (issue 39)."""
    kit = CORE.parent / "integrations" / "llm"
    graph = {}
    for path in kit.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                            and n.level == 1 and n.module} | {a.name for n in ast.walk(tree)
                                                            if isinstance(n, ast.ImportFrom) and n.level == 1
                                                            and not n.module for a in n.names}
    graph.pop("__init__", None)

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph.get(a, ()))

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if b in graph and reaches(b, a)})
    assert circles == KNOWN_KIT_CIRCLES, circles


KNOWN_KIT_CIRCLES: list = []  # none left: keep it so
