"""Errors raised by tying. Every message says what was wrong, where, and how to fix it."""


class TyingError(Exception):
    """Base class of every error that tying raises on purpose."""


class SpecError(TyingError, ValueError):
    """The spec (YAML, dict or preset name) is malformed: unknown key, wrong type, bad value."""


class SelectorError(SpecError):
    """A target selector is not a valid regex or glob, or matches no module."""


class TieError(TyingError, ValueError):
    """A tie group cannot be formed: unknown capture, or members whose shapes differ."""


class UnsupportedModuleError(TyingError, TypeError):
    """A selected module has a type that no adapter wrapper supports."""


class ConflictError(TyingError, ValueError):
    """Two targets claim the same module."""


class AlreadyAppliedError(TyingError, RuntimeError):
    """The model already carries a tying adapter."""


class NotAppliedError(TyingError, RuntimeError):
    """An operation needs an adapted model, but the model carries no tying adapter."""


class AdapterFileError(TyingError, ValueError):
    """An adapter folder or file is missing, corrupted, or does not fit the model."""


class NotMergeableError(TyingError, RuntimeError):
    """The update cannot be folded into (or out of) the base weight."""


class RegistryError(TyingError, ValueError):
    """Registering an adapter kind or a module type: a name that exists, or a missing or malformed fact."""


class ServingError(TyingError, ValueError):
    """Serving several adapters at once: a bad adapter name, batch map or adapter mix."""


class ShardingError(TyingError, RuntimeError):
    """A sharded model (FSDP2, tensor parallelism) split or wrapped so that a tied factor cannot follow, or a sharded
    checkpoint read as a plain one."""


class MetaDeviceError(TyingError, RuntimeError):
    """The adapter's factors are still on the meta device (or were materialised by ``to_empty`` and hold no values
    yet): load the base's weights (or call ``tying.materialize_``) before a forward, a save or a merge."""
