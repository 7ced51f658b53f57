"""snapguard: in-memory, erasure-coded snapshots of training state, restored in seconds.

The front door is small: `Guard` protects a training loop, `SnapGuardError` is the base of every
error. The daemon (`snapguard-daemon`) and the CLI (`snapguard`) import none of torch at start-up,
so the training-side names load lazily.
"""

from snapguard.errors import SnapGuardError

__all__ = ["Guard", "GuardConfig", "SnapGuardError", "Stateful"]


def __getattr__(name):
    if name in ("Guard", "GuardConfig"):
        from snapguard import guard

        return getattr(guard, name)
    if name == "Stateful":
        from snapguard.state import Stateful

        return Stateful
    raise AttributeError(f"module 'snapguard' has no attribute {name!r}")
