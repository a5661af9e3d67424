"""Fuzzing the spec (issue 27): random YAML text and random dicts shaped like specs either validate (and then plan
on a small model or fail there with a TyingError) or raise a TyingError; nothing else escapes, nothing hangs."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tying
from tying.errors import TyingError

KEYS = ["version", "targets", "select", "types", "exclude", "adapter", "kind", "rank", "alpha", "dropout", "factors",
        "A", "B", "u", "v", "G", "m", "pk", "pv", "tie", "train", "init", "value", "mean", "std", "bound", "gain",
        "seed", "capture", "every", "groups", "shape_aware", "freeze_base", "train_modules", "layer", "proj", "all"]
SELECTORS = ["layers.{layer:#}", "re:layers\\.(?P<layer>\\d+)", "**", "*", "re:((\\w+)\\.?)*!", "re:(", "{a}.{a}",
             "layers.{layer:0|1}", "re:.*", "{", "head"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(KEYS + SELECTORS + ["lora", "ia3", "dora", "prefix", "bottleneck", "zeros", "ones",
                                                        "normal", "kaiming_uniform", "Linear", "Conv2d"]),
                    st.text(string.printable, max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5),
                                                                       inner, max_size=5)), max_leaves=25)


@st.composite
def spec_like(draw):
    """Mostly well-formed specs with fuzzed pieces, so that validation gets past the first field."""
    factor = st.fixed_dictionaries({"init": st.sampled_from(["zeros", "ones", {"kind": "normal", "seed": 0}]) | VALUES},
                                   optional={"tie": st.sampled_from([[], ["layer"], "all", "none", ["nope"]]) | VALUES,
                                             "train": st.booleans() | VALUES, "shape_aware": st.booleans()})
    factors = draw(st.dictionaries(st.sampled_from(["A", "B", "u", "v", "G", "m", "pk", "pv", "C"]), factor,
                                   max_size=4) | VALUES)
    adapter = draw(st.fixed_dictionaries({"rank": st.integers(-1, 12) | VALUES, "factors": st.just(factors)},
                                         optional={"kind": st.sampled_from(["lora", "ia3", "dora", "bottleneck"]) | VALUES,
                                                   "alpha": st.floats() | VALUES, "dropout": st.floats(-1, 2)}))
    target = st.fixed_dictionaries({"select": st.sampled_from(SELECTORS) | VALUES},
                                   optional={"types": st.lists(st.sampled_from(["Linear", "Conv1D", "Nope"]), max_size=2),
                                             "exclude": st.lists(st.sampled_from(SELECTORS), max_size=2)})
    return draw(st.fixed_dictionaries({"targets": st.lists(target, max_size=2) | VALUES, "adapter": st.just(adapter)},
                                      optional={"train_modules": st.lists(st.sampled_from(SELECTORS), max_size=2),
                                                "freeze_base": VALUES, "version": VALUES}))


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.head = nn.Linear(6, 2)


def _load_and_plan(data):
    try:
        spec = tying.load_spec(data)
    except TyingError:
        return
    try:
        tying.plan(Tower(), spec)
    except TyingError:
        pass


FUZZ = settings(max_examples=300, deadline=3000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(spec_like())
def test_a_spec_like_dict_validates_or_raises_a_tying_error(data):
    _load_and_plan(data)


@FUZZ
@given(VALUES)
def test_any_value_validates_or_raises_a_tying_error(data):
    _load_and_plan(data)


@FUZZ
@given(st.text(string.printable, max_size=200) | spec_like().map(lambda d: yaml.safe_dump(d, sort_keys=False)))
def test_any_yaml_text_validates_or_raises_a_tying_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_text(text)
    _load_and_plan(str(path))
