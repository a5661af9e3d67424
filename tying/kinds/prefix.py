"""``prefix``: prefix tuning on attention modules. ``pk`` and ``pv`` (r x kv width; keys, values) are r virtual
tokens that every query of the layer attends to, prepended inside the attention function, so positions, the KV
cache and ``generate()`` are untouched. The module type supplies how (its ``attention`` capability: the
transformers bridge routes its ``sdpa`` attention while a prefix adapter is applied). No merged form."""

from __future__ import annotations

from ..site import SiteAdapter
from . import register_kind


class Prefix(SiteAdapter):
    """Prepends ``rank`` learned key and value entries to an attention module's keys and values."""

    shares_down = False
    no_merge = ("prefix tuning adds attention entries rather than changing a weight, so it has no merged form; "
                "keep it unmerged")

    def forward(self, *args, **kwargs):
        if self.bypass:
            return self.base(*args, **kwargs)
        return self.mtype.caps["attention"].forward(self, self.factor("pk"), self.factor("pv"), *args, **kwargs)

    def attach(self) -> None:
        self.mtype.caps["attention"].acquire(self)

    def detach(self) -> None:
        self.mtype.caps["attention"].release(self)


register_kind("prefix", wrapper=Prefix, factors={"pk": ("rank", "d_out"), "pv": ("rank", "d_out")},
              required=("pk", "pv"), rank_limit=(), needs={"attention"})
