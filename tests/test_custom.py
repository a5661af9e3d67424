"""Models that are not from transformers: a tower of Linear layers plus convolutions and an embedding."""

import pytest
import torch
from torch import nn

import tying
from tying import vocab

YAML = """
version: 1
targets:
  - select: "tower.{layer}"
    types: [Linear]
  - select: "re:(?P<conv>conv1|conv2)"
adapter:
  rank: 3
  alpha: 6
  factors:
    A: {tie: [{capture: layer, every: 2}], train: true, init: {kind: normal, std: 0.02, seed: 0}}
    B: {tie: [], train: true, init: zeros}
    u: {tie: [{capture: layer, groups: [[0, 1, 2], [3, 4, 5]]}], train: false, init: ones}
    v: {tie: all, train: true, init: {kind: constant, value: 0.5}}
"""


class Net(nn.Module):
    def __init__(self, width=16, depth=6):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.tower = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.conv1 = nn.Conv2d(1, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(1, width, kernel_size=3, padding=1)
        self.seq = nn.Conv1d(width, width, kernel_size=3, padding=1)

    def forward(self, x):
        tok, img = x
        h = self.tower(self.emb(tok))  # (N, T, w)
        h = self.seq(h.transpose(1, 2)).transpose(1, 2)
        return h.mean(1) + self.conv1(img).mean((2, 3)) + self.conv2(img).mean((2, 3))


@pytest.fixture
def net_and_input():
    torch.manual_seed(0)
    return Net().eval(), (torch.randint(0, 50, (2, 5)), torch.randn(2, 1, 8, 8))


def test_yaml_spec_ties_across_groups_of_layers(tmp_path, net_and_input):
    net, _ = net_and_input
    path = tmp_path / "spec.yaml"
    path.write_text(YAML)
    spec = tying.load_spec(path)
    c = tying.count(net, spec)
    r, w = 3, 16
    # A: tower layers in pairs -> 3 groups of (r x w); conv1, conv2 each own A (r x 1*3*3)
    a = 3 * r * w + 2 * r * 9
    b = 8 * w * r  # one B (w x r) per site: 6 tower + 2 conv
    u = 2 * r  # tower: two explicit groups; conv sites have no `layer` -> one u each
    u += 2 * r
    v = w  # one v for everything
    assert c.by_factor["A"] == {"trainable": a, "frozen": 0, "groups": 5}
    assert c.by_factor["B"]["trainable"] == b
    assert c.by_factor["u"] == {"trainable": 0, "frozen": u, "groups": 4}
    assert c.by_factor["v"] == {"trainable": v, "frozen": 0, "groups": 1}
    assert (c.trainable, c.frozen) == (a + b + v, u)
    keys = set(tying.plan(net, spec).counts.by_group)
    assert {"A.tower:[0-1]", "A.tower:[2-3]", "A.tower:[4-5]", "u.tower:[0,1,2]", "v.*"} <= keys


def test_every_kind_merges_and_round_trips(tmp_path, net_and_input):
    net, x = net_and_input
    spec = {"targets": [{"select": "re:emb|tower\\.0|conv1|seq"}],
            "adapter": {"rank": 2, "factors": {"A": {"init": {"kind": "normal", "seed": 1}},
                                               "B": {"init": {"kind": "normal", "seed": 2}},
                                               "u": {"init": "ones"}, "v": {"init": {"kind": "uniform", "seed": 3}}}}}
    with torch.no_grad():
        ref = net(x)
    tying.apply_(net, spec)
    types = {m.mtype.name for m in net.modules() if isinstance(m, tying.site.SiteAdapter)}
    assert {"Embedding", "Linear", "Conv2d"} <= types
    with torch.no_grad():
        adapted = net(x)
        assert (adapted - ref).abs().max() > 1e-3  # the update is real
        tying.merge_(net)
        assert (net(x) - adapted).abs().max() < 1e-5
        tying.unmerge_(net)
        adapted = net(x)  # merge + unmerge moved the base weights by float rounding
    tying.save_adapter(net, tmp_path)
    tying.unapply_(net)
    tying.load_adapter(net, tmp_path, replace_modules=True)
    with torch.no_grad():
        assert torch.equal(net(x), adapted)


def test_training_reduces_loss(net_and_input):
    net, x = net_and_input
    tying.apply_(net, {"targets": [{"select": "tower.*"}], "adapter": {"rank": 4, "factors": {
        "A": {"tie": "all", "init": {"kind": "kaiming_uniform", "seed": 0}}, "B": {"init": "zeros"}}}})
    with torch.no_grad():
        target = net(x) + 0.5  # a shift the adapter can learn
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = (net(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_module_types_are_known_to_the_spec_and_documented():
    from pathlib import Path

    names = set(vocab.module_type_names())
    assert {"Linear", "Conv1D", "Conv1d", "Conv2d", "Embedding", "Attention", "Linear4bit", "Linear8bitLt",
            "TorchAOLinear"} <= names
    doc = (Path(__file__).parents[1] / "docs" / "spec.md").read_text()
    assert all(f"`{n}`" in doc for n in names), [n for n in names if f"`{n}`" not in doc]


def test_train_modules_are_trained_counted_and_saved(tmp_path, net_and_input):
    net, x = net_and_input
    spec = {"targets": [{"select": "tower.{layer:#}"}], "train_modules": ["seq", "conv*"],
            "adapter": {"rank": 2, "factors": {"A": {"tie": "all", "init": {"kind": "normal", "seed": 0}},
                                               "B": {"init": "zeros"}}}}
    extra = sum(p.numel() for m in (net.seq, net.conv1, net.conv2) for p in m.parameters())
    c = tying.apply_(net, spec)
    assert c.modules == extra and c.trainable == 2 * 16 + 6 * 16 * 2 + extra
    assert all(p.requires_grad for p in net.seq.trained.parameters()) and not net.emb.weight.requires_grad
    assert not any(p.requires_grad for p in net.seq.base.parameters())  # the base keeps its values: disabling is exact
    with torch.no_grad():
        net.seq.trained.weight.add_(1.0)
        net.tying_bank["B"]["tower:0"].fill_(0.5)
        ref = net(x)
    tying.save_adapter(net, tmp_path)
    torch.manual_seed(0)  # the same base weights as the fixture's
    fresh = Net().eval()
    tying.load_adapter(fresh, tmp_path, replace_modules=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    with pytest.raises(tying.errors.ConflictError, match="both adapted"):
        tying.plan(Net(), tying.load_spec(spec, train_modules=["tower"]))
    with pytest.raises(tying.errors.SelectorError, match="train_modules selector 'head' matches no module"):
        tying.plan(Net(), tying.load_spec(spec, train_modules=["head"]))
