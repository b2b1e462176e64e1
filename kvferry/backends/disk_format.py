"""The disk tier's on-disk format and the directories it lives in.

Owns what a slot file holds and how a directory is named and laid out: the slot header codec,
the slot geometry, ``layout.json``, the file names, where a tier without ``disk.path`` lives,
the ``O_DIRECT`` probe, and the space a layout needs. Pure functions and constants: no open
files, no index, no threads (:class:`kvferry.backends.disk.DiskTier` does the I/O).

On-disk layout (format 1), under a named directory:

* ``layout.json``: slot size, slot bytes, file and slot counts. Opening a directory written with
  another layout raises :class:`~kvferry.errors.ConfigError` naming the ways out (another
  ``disk.path``, or ``disk.wipe_other_layout``, which deletes the slot files and starts afresh)
  instead of misreading the slots; a refused open changes nothing in the directory.
* ``.lock``: held with ``flock`` while a tier has the directory open; a second opener gets
  :class:`~kvferry.errors.StorageError`.
* ``slots-NNNN.kvf``: ``files`` files preallocated with ``posix_fallocate`` (a capacity above the
  filesystem's free space is refused before anything is written, unless ``force_capacity``).
  Slot ``s`` lives in file ``s % files`` at offset ``(s // files) * slot_bytes``;
  ``slot_bytes`` is a 4 KiB header block plus the payload (``context.slot_size``) rounded up to
  4 KiB, so every slot, header and payload start is page aligned for ``O_DIRECT``.

A slot's header block starts with (little endian) magic ``KVFD``, format version, flags, the 16
byte key, payload length, xxh3-64 of the payload, a generation counter, and xxh3-64 of those
fields. xxh3-64 was measured at ~78 GB/s against zlib.crc32's ~4.9 GB/s on this machine (1 MiB,
in cache), and 64 bits make an undetected torn or flipped payload practically impossible.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass

import xxhash

from kvferry.backends.base import Buffer, Key, TierContext
from kvferry.config.models import DiskTierConfig

__all__ = [
    "ALIGN",
    "DEFAULT_ROOT",
    "FORMAT_VERSION",
    "HEADER_BLOCK",
    "HEADER_BYTES",
    "LAYOUT_FILE",
    "LOCK_FILE",
    "MAGIC",
    "O_DIRECT",
    "SLOT_FILE_PATTERN",
    "SlotHeader",
    "align_up",
    "bytes_to_preallocate",
    "checksum",
    "configured_directory",
    "decode_header",
    "default_root",
    "encode_header",
    "file_slots",
    "instance_directory",
    "probe_direct_io",
    "slot_file",
]

ALIGN = 4096
"""Alignment of every offset, length and buffer address under O_DIRECT (one page)."""
HEADER_BLOCK = ALIGN
"""Bytes reserved for the header at the start of each slot; the payload starts here."""
MAGIC = b"KVFD"
FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"
LOCK_FILE = ".lock"
DEFAULT_ROOT = "~/.cache/kvferry/disk"
"""Where disk tiers without a ``disk.path`` keep their files (private tiers, store servers)."""
SLOT_FILE_PATTERN = re.compile(r"slots-\d{4}\.kvf")
"""The names of slot files (:func:`slot_file`)."""

_FIELDS = struct.Struct("<4sHH16sQQQ")  # magic, version, flags, key, length, payload sum, gen
_SUM = struct.Struct("<Q")
HEADER_BYTES = _FIELDS.size + _SUM.size
"""Bytes of the header proper (fields + header checksum) at the start of the header block."""

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
"""``os.O_DIRECT`` where the platform has it, else 0."""


def align_up(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def checksum(data: Buffer) -> int:
    """The payload and header checksum: xxh3-64 as an int."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class SlotHeader:
    """The decoded header of one slot."""

    key: Key
    length: int
    payload_checksum: int
    generation: int


def encode_header(header: SlotHeader) -> bytes:
    """The :data:`HEADER_BYTES` bytes that start a slot holding ``header``."""
    fields = _FIELDS.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        header.key,
        header.length,
        header.payload_checksum,
        header.generation,
    )
    return fields + _SUM.pack(checksum(fields))


def decode_header(data: Buffer, max_length: int) -> SlotHeader | None:
    """The header at the start of ``data``, or None when it is absent, torn or of another format.

    ``max_length`` is the largest payload a slot can hold; a longer length is a bad header.
    """
    view = memoryview(data)[:HEADER_BYTES]
    if len(view) < HEADER_BYTES:
        return None
    fields = view[: _FIELDS.size]
    magic, version, _flags, key, length, payload_sum, gen = _FIELDS.unpack(fields)
    if magic != MAGIC or version != FORMAT_VERSION or length > max_length:
        return None
    (stored,) = _SUM.unpack(view[_FIELDS.size :])
    if stored != checksum(fields):
        return None
    return SlotHeader(key, length, payload_sum, gen)


def probe_direct_io(directory: str) -> str | None:
    """Whether ``O_DIRECT`` works in ``directory``: None if it does, else the reason it does not.

    Opens a scratch file with ``O_DIRECT`` and does one page-aligned write and read, the way the
    tier will (some filesystems, e.g. tmpfs before Linux 6.6, refuse the open with EINVAL).
    """
    if not O_DIRECT:
        return "this platform has no O_DIRECT"
    path = os.path.join(directory, f".direct-probe-{os.getpid()}-{threading.get_ident()}")
    page = mmap.mmap(-1, ALIGN)  # anonymous mmap: page aligned
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o600)
    except OSError as e:
        return f"open with O_DIRECT failed: {e}"
    try:
        os.pwrite(fd, page, 0)
        os.preadv(fd, [page], 0)
    except OSError as e:
        return f"aligned O_DIRECT I/O failed: {e}"
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        page.close()
    return None


def slot_file(i: int) -> str:
    """The name of slot file ``i`` in the tier's directory."""
    return f"slots-{i:04d}.kvf"


def default_root() -> str:
    """:data:`DEFAULT_ROOT` as an absolute path (``~`` is this user's home)."""
    return os.path.abspath(os.path.expanduser(DEFAULT_ROOT))


def instance_directory(name: str) -> str:
    """The directory kvferry gives a named store instance (e.g. ``store-15428``) that was not
    given a ``disk.path``: ``~/.cache/kvferry/disk/<name>``."""
    return os.path.join(default_root(), name)


def configured_directory(config: DiskTierConfig) -> str:
    """The absolute directory of ``disk.path``; without one, the root that the private
    directory is made under."""
    return os.path.abspath(os.path.expanduser(config.path)) if config.path else default_root()


def file_slots(num_slots: int, files: int, i: int) -> int:
    """Slots in file ``i`` of ``files`` (slot s lives in file s % files)."""
    return (num_slots - i + files - 1) // files


def bytes_to_preallocate(config: DiskTierConfig, context: TierContext) -> int:
    """Bytes the slot files of ``config`` still need on their filesystem: their full size, less
    what files already there hold (a restart of the same layout needs nothing new)."""
    slot_bytes = HEADER_BLOCK + align_up(context.slot_size)
    num_slots = config.capacity // slot_bytes
    directory = configured_directory(config)
    need = 0
    for i in range(config.files):
        size = file_slots(num_slots, config.files, i) * slot_bytes
        if not config.path:  # a private tier's files are always new
            need += size
            continue
        try:
            held = os.stat(os.path.join(directory, slot_file(i))).st_blocks * 512
        except OSError:
            held = 0
        need += max(0, size - held)
    return need
