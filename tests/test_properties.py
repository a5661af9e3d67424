"""Property tests: random small models and random valid specs."""

import itertools
import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tying

TIES = st.sampled_from([[], ["layer"], "all"])


class Tower(nn.Module):
    def __init__(self, widths, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@st.composite
def cases(draw):
    widths = draw(st.lists(st.sampled_from([4, 6, 8]), min_size=3, max_size=6))
    rank = draw(st.integers(1, min(widths)))
    factors = {}
    for i, name in enumerate("ABuv"):
        if name in "uv" and not draw(st.booleans()):
            continue
        factors[name] = {"tie": draw(TIES), "train": draw(st.booleans()), "shape_aware": True,
                         "init": {"kind": "normal", "std": 0.3, "seed": i}}
    spec = {"targets": [{"select": "layers.{layer:#}"}], "adapter": {"rank": rank, "factors": factors,
                                                                     "alpha": draw(st.sampled_from([None, 1.0, 16.0]))}}
    return widths, spec


def shape(factor, r, d_in, d_out):
    return {"A": (r, d_in), "B": (d_out, r), "u": (r,), "v": (d_out,)}[factor]


def expected_counts(widths, spec):
    """Independent count: untied -> one copy per site; tied (one target, one capture) -> one per shape."""
    r = spec["adapter"]["rank"]
    trainable = frozen = 0
    for name, f in spec["adapter"]["factors"].items():
        shapes = [shape(name, r, a, b) for a, b in itertools.pairwise(widths)]
        copies = shapes if f["tie"] == [] else list(dict.fromkeys(shapes))
        n = sum(torch.Size(s).numel() for s in copies)
        trainable, frozen = (trainable + n, frozen) if f["train"] else (trainable, frozen + n)
    return trainable, frozen


@settings(max_examples=30, deadline=None)
@given(cases())
def test_random_specs(case):
    widths, spec = case
    model = Tower(widths)
    counts = tying.apply_(model, spec)
    assert (counts.trainable, counts.frozen) == expected_counts(widths, spec)
    assert sum(p.numel() for p in model.tying_bank.parameters()) == counts.trainable + counts.frozen
    x = torch.randn(5, widths[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(x)
        tying.merge_(model)
        assert (model(x) - unmerged).abs().max() < 1e-5
        tying.unmerge_(model)
    with tempfile.TemporaryDirectory() as d:
        tying.save_adapter(model, d)
        other = Tower(widths)
        tying.load_adapter(other, d)
    a, b = tying.bank_of(model).state_dict(), tying.bank_of(other).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
