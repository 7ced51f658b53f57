"""The one exception hierarchy of snapguard: every error a user can catch derives from SnapGuardError."""

from __future__ import annotations


class SnapGuardError(Exception):
    """Base of every error snapguard raises on purpose."""


class ConfigError(SnapGuardError):
    """A configuration value is missing, unknown or out of range."""


class ProtocolError(SnapGuardError):
    """A message on the wire is malformed, of an unknown version, or fails validation."""


class DaemonError(SnapGuardError):
    """The daemon answered a request with an error, or did not answer in time.

    `code` names the error the daemon reported (the name of its exception, e.g. "ChecksumError"); it is empty
    when no reply came."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class DaemonUnavailable(DaemonError):
    """No daemon answered on the expected socket within the timeout."""


class ShmSpaceError(SnapGuardError):
    """Shared memory does not have the room a snapshot slot needs."""


class LayoutError(SnapGuardError):
    """A state does not fit the planned layout, or a shard does not fit the state it is restored into."""


class ManifestVersionError(LayoutError):
    """A manifest written by a snapguard of another manifest version: its shard is intact, but not this one's to
    read."""


class ChecksumError(SnapGuardError):
    """Bytes in a slot do not match the checksums recorded when it was sealed."""


class RestoreError(SnapGuardError):
    """Ranks cannot agree on a step to restore, or the agreed step cannot be restored."""


class WorldSizeChanged(RestoreError):
    """The job restarted with another number of ranks than the job whose snapshots the daemons hold: those cannot be
    restored into it. Nothing was restored and the Guard is ready to snapshot: load the state from a checkpoint and
    train on, or restart with the old number of ranks to restore them. `world_size` and `step`: the old job's size
    and the step it sealed last."""

    def __init__(self, message: str, world_size: int, step: int):
        super().__init__(message)
        self.world_size, self.step = world_size, step


class CodecError(SnapGuardError):
    """Erasure coding got inputs it cannot work with, or more erasures than it can rebuild."""


class UnrecoverableError(SnapGuardError):
    """More chunks are lost than the erasure code can rebuild."""
