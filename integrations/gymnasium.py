"""Tied adapters on RL policies: a plain actor-critic ``nn.Module`` or a stable-baselines3 ``model.policy``.

Target sets: ``actor``, ``critic`` or ``both``: the hidden Linear layers of the actor's and the
critic's MLP bodies. Every site captures ``layer`` (its index in the body) and ``proj`` (which body:
``policy_net``/``value_net`` in SB3, or the container's name, e.g. ``actor``/``critic``), the two
captures the presets tie along. So with a tied preset (tl6, tl5, vera, ...), A (tied along
``[layer, proj]``) is shared across layers AND across actor and critic, B (``[layer]``) across layers
within each body, u (``[proj]``) across the two bodies within a layer. ``lora`` stays plain LoRA
(one A and one B per site; :func:`spec` unties the preset's A, which it ties along ``proj``).

Policy layers differ in shape (the first reads the observation; the pybullet zoo's are 128 then 64
wide), so :func:`spec` sets ``shape_aware: true`` on every tied factor: a tie group is split by
shape and ties hold exactly among the layers whose shapes allow it (group keys end in ``@<shape>``).
With ``shape_aware=False`` an impossible tie is a :class:`tying.errors.TieError` naming the members
and their shapes. The heads (``action_net``/``value_net`` in SB3, the last Linear of each body
otherwise) are not adapted but, with ``heads=True``, trained whole through the spec's
``train_modules`` (and saved with the adapter): the critic has to track the new returns.

    policy = ActorCritic(...)                                   # any module with actor/critic MLPs
    tying.apply_(policy, spec(policy, "tl6", "both", rank=4))

    model = PPO("MlpPolicy", env, ...)                          # stable-baselines3
    adapt_sb3_(model, spec(model.policy, "tl6", "both", rank=4))  # apply_ + a new policy.optimizer
    model.learn(10_000)
    save_sb3_adapter(model, "out/"); load_sb3_adapter(PPO.load("base.zip"), "out/")

SB3's ``model.save`` writes the adapted policy's state_dict, which a fresh ``PPO.load`` cannot read
back (it builds the unadapted policy): save the base model before adapting, and the adapter with
:func:`save_sb3_adapter`. A continuous policy's ``log_std`` is a bare parameter, not a module, so it
stays frozen under ``freeze_base`` (see :func:`adapt_sb3_` to train it anyway).
"""

from __future__ import annotations

import re
from typing import Literal

from torch import nn

from ..engine import apply_
from ..errors import SelectorError
from ..planner import Counts
from ..spec import TyingSpec, load_spec
from ..state import load_adapter, save_adapter

Part = Literal["actor", "critic", "both"]
PARTS = ("actor", "critic", "both")
# body container names by role, tried in order: SB3's ActorCriticPolicy, then common hand-written ones
ACTOR_NAMES = ("mlp_extractor.policy_net", "actor", "pi", "policy", "actor_net", "policy_net")
CRITIC_NAMES = ("mlp_extractor.value_net", "critic", "vf", "value", "critic_net", "value_net")
SB3_HEADS = ("action_net", "value_net")


def _linears(body: nn.Module) -> list[str]:
    return [n for n, m in body.named_children() if isinstance(m, nn.Linear) and n.isdigit()]


def _body(policy: nn.Module, names: tuple[str, ...]) -> str | None:
    modules = dict(policy.named_modules())
    for name in names:
        if isinstance(modules.get(name), nn.Sequential) and _linears(modules[name]):
            return name
    return None


def bodies(policy: nn.Module) -> dict[str, tuple[str, list[str], str | None]]:
    """``{"actor"|"critic": (body name, indices of its adapted Linear layers, head name or None)}``.

    In SB3's ActorCriticPolicy the bodies hold only hidden layers and the heads are ``action_net`` and
    ``value_net``; in a hand-written policy (``actor``/``critic`` ``nn.Sequential``, or ``pi``/``vf``,
    ...) the last Linear of each body is its head."""
    sb3 = hasattr(policy, "mlp_extractor")
    out = {}
    for role, names in (("actor", ACTOR_NAMES), ("critic", CRITIC_NAMES)):
        name = _body(policy, names)
        if name is None:
            continue
        idx = _linears(policy.get_submodule(name))
        if sb3:
            head = SB3_HEADS[role == "critic"]
            out[role] = (name, idx, head if hasattr(policy, head) else None)
        else:
            out[role] = (name, idx[:-1], f"{name}.{idx[-1]}")
    return out


def targets(policy: nn.Module, part: Part = "both") -> list[dict]:
    """Spec targets for the hidden Linear layers of the actor, the critic or both, capturing ``layer``
    and ``proj`` (the body's last name segment, e.g. ``policy_net`` or ``actor``)."""
    if part not in PARTS:
        raise SelectorError(f"unknown target set {part!r}; choose one of {', '.join(PARTS)}")
    found = bodies(policy)
    roles = ("actor", "critic") if part == "both" else (part,)
    missing = [r for r in roles if r not in found]
    if missing:
        raise SelectorError(f"{type(policy).__name__} has no {' or '.join(missing)} MLP body (looked for "
                            f"nn.Sequential children named {ACTOR_NAMES if 'actor' in missing else CRITIC_NAMES}); "
                            "write the targets yourself with selectors")
    empty = [found[r][0] for r in roles if not found[r][1]]
    if empty:
        raise SelectorError(f"{', '.join(empty)} has no hidden Linear layer to adapt (only a head)")
    out = []
    for role in roles:
        name, idx, _ = found[role]
        prefix, _, last = name.rpartition(".")
        pre = re.escape(prefix + ".") if prefix else ""
        out.append({"select": f"re:{pre}(?P<proj>{re.escape(last)})\\.(?P<layer>{'|'.join(idx)})", "types": ["Linear"]})
    return out


def head_names(policy: nn.Module) -> list[str]:
    """Names of the policy's action and value heads (trained whole when ``spec(heads=True)``)."""
    return [h for _, _, h in bodies(policy).values() if h is not None]


def spec(policy: nn.Module, preset: str | dict = "tl6", part: Part = "both", *, shape_aware: bool = True,
         heads: bool = True, **overrides) -> TyingSpec:
    """A preset (name, YAML path or dict) retargeted to the policy's ``part`` (actor, critic, both).

    ``shape_aware`` marks every tied factor shape-aware, so ties hold among the layers whose shapes
    allow them; ``False`` keeps the preset's ties strict (a TieError where shapes differ).
    ``heads`` trains the action and value heads whole (spec ``train_modules``). ``overrides`` as
    :func:`tying.load_spec` (rank, alpha, dropout, freeze_base). The preset ``lora`` is plain,
    per-site LoRA here: its A, tied along ``proj`` for fused QKV, is made per site."""
    trained = head_names(policy) if heads else None
    base = load_spec(preset, targets=targets(policy, part), train_modules=trained or None, **overrides)
    data = base.model_dump(mode="json")
    if preset == "lora":  # plain LoRA: one A per site (the preset's A tie along proj would join actor and critic)
        data["adapter"]["factors"]["A"]["tie"] = []
    for f in data["adapter"]["factors"].values():
        f["shape_aware"] = f["shape_aware"] or (shape_aware and f["tie"] != [])
    return load_spec(data)


def rebuild_optimizer_(model) -> None:
    """Give an SB3 model a fresh ``policy.optimizer`` over the policy's trainable parameters.

    SB3 builds the optimizer inside the policy's ``__init__``, over every parameter then present: it
    knows nothing of the adapter's factors and still holds the frozen base weights. SB3 sets the
    learning rate on every update from ``model.lr_schedule``, so the new optimizer needs only the
    class and kwargs the policy was built with."""
    pol = model.policy
    params = [p for p in pol.parameters() if p.requires_grad]
    pol.optimizer = pol.optimizer_class(params, lr=model.lr_schedule(1), **pol.optimizer_kwargs)


def adapt_sb3_(model, spec_: TyingSpec | dict | str, *, train_params: tuple[str, ...] = ()) -> Counts:
    """Apply a tying spec to ``model.policy`` in place and rebuild its optimizer; return the counts.

    ``train_params`` names bare policy parameters to keep trainable although the base is frozen, e.g.
    ``("log_std",)`` for a continuous PPO policy. They are not modules, so the adapter file does not
    hold them (unlike ``train_modules``): save them yourself if you train them."""
    counts = apply_(model.policy, spec_)
    for name in train_params:
        model.policy.get_parameter(name).requires_grad_(True)
    rebuild_optimizer_(model)
    return counts


def save_sb3_adapter(model, directory) -> None:
    """Save the adapter of ``model.policy`` (spec, factors, trained heads) to ``directory``."""
    save_adapter(model.policy, directory)


def load_sb3_adapter(model, directory, *, replace_modules: bool = False) -> None:
    """Apply and load a saved adapter onto ``model.policy`` (an unadapted SB3 model, e.g. from
    ``PPO.load`` of the base), then rebuild its optimizer. An adapter with trained heads replaces the policy's
    heads: pass ``replace_modules=True`` for a folder you trust (as :func:`tying.load_adapter`)."""
    load_adapter(model.policy, directory, replace_modules=replace_modules)
    rebuild_optimizer_(model)
