"""The one exception hierarchy of kvferry.

Every error kvferry raises on purpose is a :class:`KvferryError`::

    KvferryError
    ├── ConfigError            bad config key/value; names the key, the value and what is valid
    ├── MissingDependency      an optional extra is not installed; names the extra
    ├── SegmentError           unknown segment/region, registration failure, out-of-bounds range
    ├── StorageError           a store tier could not store or load (I/O error, Redis down, ...)
    │   └── LeaseExpired       a prepare/complete handle whose pins already expired or ended
    ├── ProtocolError          a malformed, oversize or unauthorised frame on the wire
    │   └── AuthError          the peer's shared token did not match
    └── TransferError          a transfer that did not complete
        ├── PeerClosed         the peer closed the connection or could not be reached
        ├── TransferTimeout    no completion within ``transfer_timeout``
        └── RemoteError        the peer answered with an error reply (its message inside)

Public APIs never return ``None`` or an integer code to mean failure; they raise one of these,
chaining the low-level cause with ``raise ... from e``.
"""

from __future__ import annotations


class KvferryError(Exception):
    """Base class of every error kvferry raises on purpose."""


class ConfigError(KvferryError, ValueError):
    """A config key or value is invalid; the message names the key, the value and what is valid."""


class MissingDependency(KvferryError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"{module} is not installed; install it with: pip install 'kvferry[{extra}]'"
        )
        self.module = module
        self.extra = extra


class SegmentError(KvferryError):
    """A segment or memory region is unknown, cannot be registered, or a range is out of bounds."""


class StorageError(KvferryError):
    """A store tier failed to store or load blocks; the message names the tier and the cause."""


class LeaseExpired(StorageError):
    """A two-phase handle was completed after its lease ran out (or twice); its pins are gone."""


class ProtocolError(KvferryError):
    """A frame on the wire is malformed, oversize, of an unknown version or op."""


class AuthError(ProtocolError):
    """The peer did not present the shared token this listener requires."""


class TransferError(KvferryError):
    """A transfer did not complete."""


class PeerClosed(TransferError):
    """The peer closed the connection, died, or could not be reached."""


class TransferTimeout(TransferError):
    """A transfer made no progress within ``transfer_timeout``."""


class RemoteError(TransferError):
    """The peer answered a request with an error reply; the message is the peer's."""


__all__ = [
    "AuthError",
    "ConfigError",
    "KvferryError",
    "MissingDependency",
    "PeerClosed",
    "ProtocolError",
    "RemoteError",
    "SegmentError",
    "TransferError",
    "TransferTimeout",
]
