"""Bridges that wait for a library: ``when_imported("peft", "tying.integrations.peft:register")`` imports the bridge
and calls its ``register`` as soon as ``peft`` has finished importing (at once if it already has).

This top-level module imports only ``sys`` at start-up (the finder and loader follow the import protocol by duck
typing: ``importlib.abc`` alone costs ~10 ms), so that ``tying-bridges.pth`` (installed into site-packages with tying)
can run :func:`autoload` at every interpreter start-up for the cost of one small import:
any process where tying is installed then knows tying's PEFT method the moment it imports ``peft``, without
``import tying`` (``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, the lm-eval CLI with ``peft=``).
tying itself never imports PEFT. A bridge that fails is reported as a warning; the library's own import is never
broken."""

from __future__ import annotations

import sys

_WAITING: dict[str, str] = {}  # library -> bridge module
BRIDGES = {"peft": "tying.integrations.peft:register"}  # what autoload() waits for


def autoload() -> None:
    """Wait for every library in :data:`BRIDGES` (tying-bridges.pth calls this at start-up)."""
    for library, bridge in BRIDGES.items():
        when_imported(library, bridge)


def when_imported(library: str, bridge: str) -> None:
    """Call ``bridge`` (``module:function``) once ``library`` (a top-level package) is imported."""
    if library in sys.modules:
        _load(library, bridge)
        return
    _WAITING[library] = bridge
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _load(library: str, bridge: str) -> None:
    import importlib
    import warnings

    module, _, function = bridge.partition(":")
    try:
        getattr(importlib.import_module(module), function)()
    except Exception as e:  # noqa: BLE001  the user's import of the library must go on
        warnings.warn(f"tying could not register with {library} ({type(e).__name__}: {e})", stacklevel=3)


class _Loader:
    """The library's own loader, then the bridge."""

    def __init__(self, loader, library: str):
        self.loader, self.library = loader, library

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        bridge = _WAITING.pop(self.library, None)
        if bridge is not None:
            _load(self.library, bridge)

    def __getattr__(self, name):  # resource readers and the like
        return getattr(self.loader, name)


class _Finder:
    """Finds a waited-for library through the other finders and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name not in _WAITING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, name)
                return spec
        return None
