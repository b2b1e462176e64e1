"""This host's identity, as peers compare it to decide that they share memory.

A target announces its boot id in the handshake (``PeerInfo.boot_id``); an initiator whose own
boot id is the same knows the target runs on this kernel, so the target's shared memory can be
mapped through ``/proc/<pid>/fd`` (the shm transport, the server tier's same-host path). Used by
the transfer engine and by the server tier; nothing here does I/O beyond reading one proc file.

When the kernel does not tell its boot id, the id is ``""``, which means "unknown" and never
matches, not even another ``""``: two processes that cannot prove they share a kernel talk over
tcp. A hostname would be the wrong stand-in: containers on different hosts share hostnames
(``localhost``, an image's default), and a false "same host" has an initiator open
``/proc/<pid>/fd/<fd>`` of some unrelated process, guarded by nothing but the inode check.
"""

from __future__ import annotations

__all__ = ["BOOT_ID_PATH", "boot_id", "same_host"]

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
"""Where Linux tells the id of the running boot (a UUID, new at each boot)."""


def boot_id(path: str = BOOT_ID_PATH) -> str:
    """This host's boot id, or ``""`` (unknown) when ``path`` cannot be read.

    Args:
        path: the proc file to read (a test points it elsewhere).
    """
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def same_host(local: str, peer: str) -> bool:
    """Whether a peer that announced boot id ``peer`` runs on the kernel of ``local``; an
    unknown id (``""``) on either side is never the same host."""
    return bool(local) and local == peer
