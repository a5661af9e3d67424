"""tying.integrations.gymnasium: shape-aware ties on small random policies, clear tie errors, an SB3 PPO
model that trains and saves/loads its adapter; the pybullet zoo (slow)."""

import itertools

import pytest
import torch
from torch import nn
from tying.integrations import gymnasium as tg

import tying
from tying.errors import SelectorError, TieError

R = 2


def mlp(sizes, act=nn.Tanh):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """A plain actor-critic: ``actor`` and ``critic`` MLPs whose last Linear is the head."""

    def __init__(self, obs=5, act=3, actor=(16, 16, 16), critic=(16, 16, 16), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.actor, self.critic = mlp([obs, *actor, act]), mlp([obs, *critic, 1])

    def forward(self, x):
        return self.actor(x), self.critic(x)


def groups(model, spec):
    return {f"{g.factor}.{g.key}": len(g.members) for g in tying.plan(model, spec).groups}


def test_bodies_and_targets_of_a_plain_policy():
    model = ActorCritic()
    assert tg.bodies(model) == {"actor": ("actor", ["0", "2", "4"], "actor.6"),
                                "critic": ("critic", ["0", "2", "4"], "critic.6")}
    assert tg.head_names(model) == ["actor.6", "critic.6"]
    sites = [s.name for s in tying.plan(model, tg.spec(model, "lora", "both", rank=R)).sites]
    assert sites == ["actor.0", "actor.2", "actor.4", "critic.0", "critic.2", "critic.4"]  # heads not adapted
    assert [s.name for s in tying.plan(model, tg.spec(model, "lora", "critic", rank=R)).sites] == ["critic.0", "critic.2", "critic.4"]


def test_shape_aware_groups_and_counts_equal_widths():
    """3 x 16 hidden in both bodies, obs 5: A splits into the first layers (5 wide) and the rest (16 wide),
    each shared across actor and critic; B is one per body."""
    model, d, o, L = ActorCritic(), 16, 5, 3
    spec = tg.spec(model, "tl6", "both", rank=R)
    assert groups(model, spec) == {
        "A.*:*@2x5": 2, "A.*:*@2x16": 4, "B.actor:*@16x2": 3, "B.critic:*@16x2": 3,
        "u.*:0@2": 2, "u.*:2@2": 2, "u.*:4@2": 2, **{f"v.{n}:{i}": 1 for n in ("actor", "critic") for i in (0, 2, 4)}}
    heads = (d * 3 + 3) + (d + 1)
    c = tying.count(model, spec)
    assert c.modules == heads
    assert c.trainable == R * o + R * d + 2 * d * R + L * R + 2 * L * d + heads
    lora = tying.count(model, tg.spec(model, "lora", "both", rank=R))
    assert lora.trainable == 2 * (R * (o + d) + 2 * R * (d + d)) + heads
    vera = tying.count(model, tg.spec(model, "vera", "both", rank=R))
    assert (vera.trainable, vera.frozen) == (L * R + 2 * L * d + heads, R * o + R * d + 2 * d * R)


def test_shape_aware_groups_zoo_shaped_actor():
    """The pybullet zoo's 15 -> 128 -> 64 actor: layers of two widths, so nothing can be tied across them
    but the tie along ``proj`` (actor and critic) still holds where the critic has the same shapes."""
    model = ActorCritic(obs=15, actor=(128, 64), critic=(128, 64))
    assert groups(model, tg.spec(model, "tl5", "both", rank=R)) == {
        "A.*:*@2x15": 2, "A.*:*@2x128": 2, "B.actor:*@128x2": 1, "B.actor:*@64x2": 1,
        "B.critic:*@128x2": 1, "B.critic:*@64x2": 1}
    mixed = ActorCritic(obs=15, actor=(32, 32, 32), critic=(64, 32, 32))  # actor and critic tie only where shapes match
    g = groups(mixed, tg.spec(mixed, "tl5", "both", rank=R))
    assert g["A.*:*@2x15"] == 2 and g["A.*:*@2x32"] == 3 and g["A.*:*@2x64"] == 1
    assert g["B.actor:*@32x2"] == 3 and g["B.critic:*@64x2"] == 1 and g["B.critic:*@32x2"] == 2


def test_impossible_tie_is_a_clear_error():
    model = ActorCritic(obs=15, actor=(128, 64), critic=(128, 64))
    with pytest.raises(TieError) as e:
        tying.plan(model, tg.spec(model, "tl6", "actor", rank=R, shape_aware=False))
    msg = str(e.value)
    assert "factor A" in msg and "2x15: actor.0" in msg and "2x128: actor.2" in msg and "shape_aware" in msg
    explicit = {"targets": tg.targets(model, "actor"), "adapter": {"rank": R, "factors": {
        "A": {"tie": [{"capture": "layer", "groups": [[0, 2]]}], "init": "kaiming_uniform"},
        "B": {"tie": [], "init": "zeros"}}}}
    with pytest.raises(TieError, match=r"tie group 'actor:\[0,2\]'.*2x15: actor.0; 2x128: actor.2"):
        tying.plan(model, tying.load_spec(explicit))


def test_unknown_part_and_missing_body():
    model = ActorCritic()
    with pytest.raises(SelectorError, match="choose one of actor, critic, both"):
        tg.targets(model, "value")
    with pytest.raises(SelectorError, match="no critic MLP body"):
        tg.targets(nn.ModuleDict({"actor": mlp([4, 8, 2])}), "critic")


def test_plain_policy_trains_and_merges():
    model, x = ActorCritic(), torch.randn(32, 5)
    tying.apply_(model, tg.spec(model, "tl6", "both", rank=R))
    assert all(p.requires_grad for p in model.actor[6].trained.parameters())  # heads trained whole (a copy)
    assert not any(p.requires_grad for p in model.actor[6].base.parameters())
    assert not model.actor[0].base.weight.requires_grad
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(32, 3)
    for _ in range(5):
        loss = ((model(x)[0] - target) ** 2).mean() + model(x)[1].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a = model(x)[0]
        tying.merge_(model)
        assert torch.allclose(a, model(x)[0], atol=1e-5)


def ppo(seed=0, env_id="CartPole-v1"):
    """A small SB3 PPO model; skips the calling test (alone) without the rl extra."""
    sb3, gym = pytest.importorskip("stable_baselines3"), pytest.importorskip("gymnasium")
    return sb3.PPO("MlpPolicy", gym.make(env_id), n_steps=64, batch_size=32, n_epochs=2, seed=seed, device="cpu",
                   policy_kwargs={"net_arch": {"pi": [16, 16, 16], "vf": [16, 16, 16]}})


def test_sb3_targets_heads_and_counts():
    model = ppo()
    assert tg.head_names(model.policy) == ["action_net", "value_net"]
    spec = tg.spec(model.policy, "tl6", "both", rank=R)
    g = groups(model.policy, spec)
    assert g["A.mlp_extractor:*:*@2x4"] == 2 and g["A.mlp_extractor:*:*@2x16"] == 4
    assert g["B.mlp_extractor:policy_net:*@16x2"] == 3 and g["B.mlp_extractor:value_net:*@16x2"] == 3
    assert tying.count(model.policy, spec).modules == (16 * 2 + 2) + (16 + 1)


@pytest.mark.parametrize("preset", ["lora", "tl6", "vera"])
def test_sb3_ppo_trains_and_saves_adapter(tmp_path, preset):
    model = ppo()
    base_path = tmp_path / "base.zip"
    model.save(base_path)  # the base, before adapting (SB3 cannot load an adapted policy's state_dict)
    base_w = model.policy.mlp_extractor.policy_net[2].weight.detach().clone()
    counts = tg.adapt_sb3_(model, tg.spec(model.policy, preset, "both", rank=R))
    opt_params = {id(p) for grp in model.policy.optimizer.param_groups for p in grp["params"]}
    trainable = [p for p in model.policy.parameters() if p.requires_grad]
    assert opt_params == {id(p) for p in trainable} and sum(p.numel() for p in trainable) == counts.trainable
    bank0 = {k: v.detach().clone() for k, v in model.policy.tying_bank.state_dict().items()}
    model.learn(128)  # two PPO updates
    changed = [k for k, v in model.policy.tying_bank.state_dict().items() if not torch.equal(v, bank0[k])]
    assert changed and torch.equal(model.policy.mlp_extractor.policy_net[2].base.weight, base_w)

    tg.save_sb3_adapter(model, tmp_path / "adapter")
    fresh = type(model).load(base_path, device="cpu")
    tg.load_sb3_adapter(fresh, tmp_path / "adapter", replace_modules=True)
    obs = torch.randn(8, 4)
    with torch.no_grad():
        for a, b in [(model.policy.get_distribution(obs).distribution.logits,
                      fresh.policy.get_distribution(obs).distribution.logits),
                     (model.policy.predict_values(obs), fresh.policy.predict_values(obs))]:
            assert torch.allclose(a, b, atol=1e-6)
    fresh.set_env(model.get_env())
    fresh.learn(64)  # the loaded model keeps training with its rebuilt optimizer


def test_sb3_continuous_policy_log_std(tmp_path):
    model = ppo(env_id="Pendulum-v1")
    tg.adapt_sb3_(model, tg.spec(model.policy, "tl6", "actor", rank=R), train_params=("log_std",))
    assert model.policy.log_std.requires_grad
    assert any(p is model.policy.log_std for p in model.policy.optimizer.param_groups[0]["params"])
    before = model.policy.log_std.detach().clone()
    model.learn(64)
    assert not torch.equal(before, model.policy.log_std)


def test_sb3_torch_save_of_adapted_policy(tmp_path):
    model = ppo()
    tg.adapt_sb3_(model, tg.spec(model.policy, "tl6", "both", rank=R))
    torch.save(model.policy, tmp_path / "policy.pt")
    policy = torch.load(tmp_path / "policy.pt", weights_only=False)
    obs = torch.randn(4, 4)
    with torch.no_grad():
        assert torch.equal(policy.predict_values(obs), model.policy.predict_values(obs))
    assert tying.bank_of(policy).spec == tying.bank_of(model.policy).spec


@pytest.mark.slow
def test_pybullet_zoo_policy_is_the_zoo():
    """The zoo's Hopper, loaded into SB3 PPO, scores like the zoo (about 2,200+) under Earth's gravity."""
    pytest.importorskip("pybullet")
    from tying.integrations.pybullet_zoo import ZooEnv, zoo_ppo, zoo_weights

    w = zoo_weights("HopperBulletEnv-v0")
    assert w["weights_dense1_w"].shape == (15, 128) and w["weights_final_w"].shape == (64, 3)
    env = ZooEnv("HopperBulletEnv-v0")
    model = zoo_ppo("HopperBulletEnv-v0", env)
    obs, _ = env.reset(seed=0)
    x = torch.from_numpy(obs)
    h = torch.relu(torch.relu(x @ torch.from_numpy(w["weights_dense1_w"]) + torch.from_numpy(w["weights_dense1_b"]))
             @ torch.from_numpy(w["weights_dense2_w"]) + torch.from_numpy(w["weights_dense2_b"]))
    zoo_action = (h @ torch.from_numpy(w["weights_final_w"]) + torch.from_numpy(w["weights_final_b"])).clamp(-1, 1)
    assert torch.allclose(torch.from_numpy(model.predict(obs, deterministic=True)[0]), zoo_action, atol=1e-5)
    total, done = 0.0, False
    while not done:
        obs, r, term, trunc, _ = env.step(model.predict(obs, deterministic=True)[0])
        total, done = total + r, term or trunc
    assert total > 2000
    spec = tg.spec(model.policy, "tl6", "actor", rank=4)
    assert groups(model.policy, spec)["A.mlp_extractor:*:*@4x15"] == 1
