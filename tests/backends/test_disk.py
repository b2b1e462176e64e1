"""The disk tier on real files: the conformance kit, restart, corruption, torn writes, a SIGKILLed
writer, O_DIRECT where the filesystem takes it and the buffered fallback where it does not.

Corruption and torn writes are made by writing bytes into the slot files on disk, the way a
crash or a bad sector would leave them; the crash test kills a real writer process.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.disk import (
    ALIGN,
    HEADER_BLOCK,
    DiskTier,
    SlotHeader,
    bytes_to_preallocate,
    checksum,
    encode_header,
)
from kvferry.config.models import DiskTierConfig
from kvferry.errors import ConfigError, StorageError
from kvferry.testing.tier_kit import check_tier, key, value

REPO = Path(__file__).resolve().parents[2]
SLOT = 3 * ALIGN  # a full block is page sized: the zero-copy O_DIRECT path applies
SLOT_BYTES = HEADER_BLOCK + SLOT


def _takes_o_direct(directory: Path) -> bool:
    """Checked here with plain os calls, independently of the tier's own probe."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    path = directory / "o_direct_check"
    page = mmap.mmap(-1, ALIGN)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flag, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, page, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink()


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem that takes O_DIRECT: tmp_path, else one under the repo (when
    /tmp is a tmpfs without O_DIRECT)."""
    if _takes_o_direct(tmp_path):
        yield tmp_path
        return
    base = REPO / ".pytest_disk"
    base.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base))
    try:
        if not _takes_o_direct(path):
            pytest.fail(
                "no filesystem here takes O_DIRECT (tmp_path nor the repo's): the O_DIRECT "
                "path would go untested; run the tests on a disk-backed filesystem"
            )
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        try:
            base.rmdir()  # only when no other test run is using it
        except OSError:
            pass


def open_tier(
    path: Path, *, slots: int = 32, slot_size: int = SLOT, direct: bool = True, **kw: int
) -> DiskTier:
    slot_bytes = HEADER_BLOCK + -(-slot_size // ALIGN) * ALIGN
    config = DiskTierConfig(path=str(path), capacity=slots * slot_bytes, direct_io=direct, **kw)
    return DiskTier(config, TierContext(slot_size=slot_size))


def aligned(data: bytes) -> memoryview:
    """``data`` in a page-aligned buffer (anonymous mmap)."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


def read_all(tier: DiskTier, keys: list[bytes], size: int = SLOT) -> list[bytes | None]:
    outs = [memoryview(bytearray(size)) for _ in keys]
    got = tier.get(keys, outs)
    return [None if n is None else bytes(o[:n]) for n, o in zip(got, outs)]


def slot_offset(path: Path, k: bytes) -> int:
    """Offset of the slot holding key ``k`` in the (single) slot file, found on disk."""
    data = (path / "slots-0000.kvf").read_bytes()
    offset = data.find(b"KVFD\x01\x00\x00\x00" + k)  # magic, version, flags, key
    assert offset >= 0 and offset % SLOT_BYTES == 0, "no slot header for the key on disk"
    return offset


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path / "slots-0000.kvf", "r+b") as f:
        f.seek(offset)
        f.write(data)


# ---- conformance ------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("slot_size", [SLOT, 10_000], ids=["page_multiple", "odd_size"])
def test_conformance_kit(direct_dir: Path, direct: bool, slot_size: int) -> None:
    n = itertools.count()
    opened: list[DiskTier] = []

    def factory() -> DiskTier:
        tier = open_tier(direct_dir / f"t{next(n)}", slot_size=slot_size, direct=direct)
        opened.append(tier)
        return tier

    check_tier(factory, slot_size=slot_size)
    assert opened, "the kit built no tier"
    assert {t.stats().extra["direct_io"] for t in opened} == {1.0 if direct else 0.0}


def test_o_direct_is_used_and_moves_aligned_and_unaligned_buffers(direct_dir: Path) -> None:
    tier = open_tier(direct_dir, io_threads=4)
    try:
        assert tier.stats().extra["direct_io"] == 1.0
        flags = [os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL) for fd in tier._fds]
        assert all(flags), "slot files are not open with O_DIRECT"
        keys = [key(i) for i in range(8)]
        vals = [value(i, SLOT if i % 2 else SLOT - 777) for i in range(8)]
        # aligned page-multiple sources go straight to disk; the others through a bounce buffer
        srcs = [aligned(v) if len(v) % ALIGN == 0 else v for v in vals]
        assert tier.put(keys, srcs) == [PutStatus.STORED] * 8
        outs = [memoryview(mmap.mmap(-1, SLOT)) for _ in keys]
        assert tier.get(keys, outs) == [len(v) for v in vals]
        assert [bytes(o[: len(v)]) for o, v in zip(outs, vals)] == vals
        assert read_all(tier, keys) == vals  # unaligned bytearray outs
    finally:
        tier.close()


# ---- restart ------------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_restart_rebuilds_index_and_serves_the_same_bytes(direct_dir: Path, direct: bool) -> None:
    keys = [key(i, 1) for i in range(20)]
    vals = [value(i, SLOT - 300 * (i % 4)) for i in range(20)]
    tier = open_tier(direct_dir, direct=direct, files=3, io_threads=3)
    assert tier.put(keys, vals) == [PutStatus.STORED] * 20
    tier.close()

    tier = open_tier(direct_dir, direct=direct, files=3, io_threads=3)
    try:
        assert sorted(tier.keys()) == sorted(keys)
        assert read_all(tier, keys) == vals
        stats = tier.stats()
        assert stats.extra["recovered_blocks"] == 20 and stats.used_blocks == 20
        assert stats.used_bytes == sum(len(v) for v in vals)
        # the rebuilt free list holds exactly the other slots
        more = [key(i, 2) for i in range(tier.capacity_blocks - 20 + 1)]
        status = tier.put(more, [value(i, 100) for i in range(len(more))])
        assert status == [PutStatus.STORED] * (len(more) - 1) + [PutStatus.NO_SPACE]
        assert tier.put(keys[:1], [b"x"]) == [PutStatus.EXISTS]
        assert read_all(tier, keys) == vals, "a put after restart overwrote a recovered block"
    finally:
        tier.close()


def test_delete_survives_restart(direct_dir: Path) -> None:
    keys = [key(i, 3) for i in range(6)]
    tier = open_tier(direct_dir)
    tier.put(keys, [value(i, 500) for i in range(6)])
    assert tier.delete(keys[::2]) == 3
    tier.close()
    tier = open_tier(direct_dir)
    try:
        assert sorted(tier.keys()) == sorted(keys[1::2])
        assert tier.contains(keys) == [False, True] * 3
        assert tier.used_blocks == 3
    finally:
        tier.close()


def test_layout_change_is_refused_not_misread(direct_dir: Path) -> None:
    tier = open_tier(direct_dir, slots=8)
    tier.put([key(1)], [value(1, 64)])
    tier.close()
    with pytest.raises(ConfigError, match="another layout") as info:
        open_tier(direct_dir, slots=8, slot_size=2 * SLOT)
    message = str(info.value)
    assert "slot_size" in message and str(direct_dir) in message and "\n" not in message
    # what to do: another directory, or empty this one
    assert "--disk-path" in message and "disk.wipe_other_layout" in message
    assert "--wipe-disk" in message
    tier = open_tier(direct_dir, slots=8)  # the failed open released the directory
    try:
        assert tier.keys() == [key(1)]
    finally:
        tier.close()


def test_wipe_other_layout_starts_empty_and_leaves_other_files(direct_dir: Path) -> None:
    tier = open_tier(direct_dir, slots=8, files=2)
    tier.put([key(1)], [value(1, 64)])
    tier.close()
    (direct_dir / "notes.txt").write_text("not the tier's")
    tier = open_tier(direct_dir, slots=4, slot_size=2 * SLOT, wipe_other_layout=True)
    try:
        assert tier.keys() == [] and tier.stats().total_blocks == 4
        assert tier.put([key(2)], [value(2, 2 * SLOT)]) == [PutStatus.STORED]
    finally:
        tier.close()
    assert (direct_dir / "notes.txt").read_text() == "not the tier's"
    assert not (direct_dir / "slots-0001.kvf").exists(), "a slot file of the old layout is left"
    tier = open_tier(direct_dir, slots=4, slot_size=2 * SLOT)  # the new layout is the layout now
    try:
        assert tier.keys() == [key(2)]
    finally:
        tier.close()


def test_an_unreadable_layout_file_names_the_same_choices(direct_dir: Path) -> None:
    (direct_dir / "layout.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"unreadable layout\.json") as info:
        open_tier(direct_dir)
    assert "--disk-path" in str(info.value) and "--wipe-disk" in str(info.value)
    tier = open_tier(direct_dir, wipe_other_layout=True)
    try:
        assert tier.put([key(1)], [value(1, 64)]) == [PutStatus.STORED]
    finally:
        tier.close()


def test_no_path_means_unnamed_files_of_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # disk.path unset: two tiers at once (no lock between them), files nobody else can open or
    # find, so nothing is left behind however the process ends
    monkeypatch.setenv("HOME", str(tmp_path))
    root = tmp_path / ".cache" / "kvferry" / "disk"
    config = DiskTierConfig(capacity=8 * SLOT_BYTES, direct_io=False)
    tiers = [DiskTier(config, TierContext(slot_size=SLOT)) for _ in range(2)]
    try:
        for i, tier in enumerate(tiers):
            assert tier.put([key(i)], [value(i, SLOT)]) == [PutStatus.STORED]
        for i, tier in enumerate(tiers):
            assert read_all(tier, [key(0), key(1)]) == [
                value(i, SLOT) if j == i else None for j in range(2)
            ]
            assert tier.stats().extra["file_bytes"] == 8 * SLOT_BYTES
            assert tier.where() == f"unnamed files of this process under {root}"
        assert root.is_dir() and list(root.iterdir()) == []
    finally:
        for tier in tiers:
            tier.close()
    assert list(root.iterdir()) == []


def test_a_named_directory_is_reported_where_it_is(direct_dir: Path) -> None:
    tier = open_tier(direct_dir)
    try:
        assert tier.where() == str(direct_dir)
    finally:
        tier.close()


def test_second_open_of_a_directory_is_refused(direct_dir: Path) -> None:
    tier = open_tier(direct_dir)
    try:
        with pytest.raises(StorageError, match="in use by another process") as info:
            open_tier(direct_dir)
        assert str(direct_dir) in str(info.value) and "--disk-path" in str(info.value)
    finally:
        tier.close()


# ---- corruption and torn writes ---------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("restart", [True, False], ids=["after_restart", "while_open"])
def test_corrupt_payload_is_dropped_not_served(
    direct_dir: Path, direct: bool, restart: bool
) -> None:
    keys = [key(i, 4) for i in range(3)]
    vals = [value(i, SLOT) for i in range(3)]
    tier = open_tier(direct_dir, direct=direct)
    tier.put(keys, vals)
    offset = slot_offset(direct_dir, keys[1])
    if restart:
        tier.close()
    flipped = bytes([vals[1][1234] ^ 0x01])
    write_at(direct_dir, offset + HEADER_BLOCK + 1234, flipped)  # one bit of the payload
    if restart:
        tier = open_tier(direct_dir, direct=direct)
    try:
        assert tier.contains(keys) == [True] * 3, "the header is intact: listed until read"
        outs = [memoryview(mmap.mmap(-1, SLOT)) for _ in keys]
        got = tier.get(keys, outs)
        assert got == [SLOT, None, SLOT], "a corrupt block must read as a miss"
        assert bytes(outs[0]) == vals[0] and bytes(outs[2]) == vals[2]
        assert tier.stats().extra["corrupt_dropped"] == 1
        assert tier.contains(keys) == [True, False, True]
        assert tier.put([keys[1]], [vals[1]]) == [PutStatus.STORED]  # the key can come back
        assert read_all(tier, keys) == vals
    finally:
        tier.close()


@pytest.mark.parametrize("io_threads", [1, 4])
@pytest.mark.parametrize("outs_aligned", [True, False], ids=["zero_copy", "bounced"])
def test_a_pipelined_get_verifies_every_block(
    direct_dir: Path, io_threads: int, outs_aligned: bool
) -> None:
    """A batch longer than the readers' lead over the verifier, with corrupt blocks early and
    late in it: exactly those read as misses, and a bounced corrupt block never reaches its out
    buffer (the checksum runs before the copy, on another thread than the read)."""
    n = 14
    keys = [key(i, 11) for i in range(n)]
    vals = [value(i, SLOT) for i in range(n)]
    tier = open_tier(direct_dir, io_threads=io_threads)
    try:
        assert tier.put(keys, [aligned(v) for v in vals]) == [PutStatus.STORED] * n
        bad = {1, 12}
        for i in bad:
            write_at(direct_dir, slot_offset(direct_dir, keys[i]) + HEADER_BLOCK + 77, b"\xa5")
        if outs_aligned:
            outs = [memoryview(mmap.mmap(-1, SLOT)) for _ in keys]
        else:  # one byte off a page: the payload goes through a bounce buffer
            outs = [memoryview(bytearray(SLOT + 1))[1:] for _ in keys]
        for o in outs:
            o[:] = b"\xee" * SLOT
        got = tier.get(keys, outs)
        assert got == [None if i in bad else SLOT for i in range(n)]
        for i in range(n):
            if i not in bad:
                assert bytes(outs[i]) == vals[i], f"block {i} read back other bytes"
            elif not outs_aligned:
                assert bytes(outs[i]) == b"\xee" * SLOT, "unverified bytes reached the out buffer"
        assert tier.stats().extra["corrupt_dropped"] == 2
        assert tier.contains(keys) == [i not in bad for i in range(n)]
    finally:
        tier.close()


def test_dropped_block_stays_gone_after_restart(direct_dir: Path) -> None:
    tier = open_tier(direct_dir)
    tier.put([key(1), key(2)], [value(1, 999), value(2, 999)])
    write_at(direct_dir, slot_offset(direct_dir, key(1)) + HEADER_BLOCK, b"\xff\xfe")
    assert read_all(tier, [key(1)]) == [None]
    tier.close()
    tier = open_tier(direct_dir)
    try:
        assert tier.keys() == [key(2)], "a dropped block's header must be wiped on disk"
    finally:
        tier.close()


def test_torn_header_is_ignored_on_restart(direct_dir: Path) -> None:
    tier = open_tier(direct_dir, slots=4)
    keys = [key(i, 6) for i in range(4)]
    vals = [value(i, 2000) for i in range(4)]
    assert tier.put(keys, vals) == [PutStatus.STORED] * 4
    offset = slot_offset(direct_dir, keys[2])
    tier.close()
    # a header torn mid-write: the tail of the generation field is from another write
    write_at(direct_dir, offset + 40, b"\x5a\x5a")
    tier = open_tier(direct_dir, slots=4)
    try:
        assert sorted(tier.keys()) == sorted(keys[:2] + keys[3:])
        assert read_all(tier, keys) == [vals[0], vals[1], None, vals[3]]
        assert tier.used_blocks == 3
        # the slot with the torn header is free again
        assert tier.put([key(9, 6)], [value(9, 10)]) == [PutStatus.STORED]
        assert tier.put([key(10, 6)], [value(10, 10)]) == [PutStatus.NO_SPACE]
    finally:
        tier.close()


def test_torn_payload_is_caught_by_the_payload_checksum(direct_dir: Path) -> None:
    """A new header over half of a new payload (the rest still the old block's bytes)."""
    tier = open_tier(direct_dir, slots=4)
    old, new = value(1, SLOT), value(2, SLOT)
    tier.put([key(1)], [old])
    offset = slot_offset(direct_dir, key(1))
    tier.close()
    header = encode_header(SlotHeader(key(2), SLOT, checksum(new), generation=50))
    write_at(direct_dir, offset, header + bytes(HEADER_BLOCK - len(header)) + new[: SLOT // 2])
    tier = open_tier(direct_dir, slots=4)
    try:
        assert tier.keys() == [key(2)], "the header is valid, so the scan lists the key"
        assert read_all(tier, [key(2)]) == [None]
        assert tier.stats().extra["corrupt_dropped"] == 1
    finally:
        tier.close()


@pytest.mark.parametrize("newer_second", [True, False])
def test_two_slots_claiming_a_key_keep_the_higher_generation(
    direct_dir: Path, newer_second: bool
) -> None:
    tier = open_tier(direct_dir, slots=4)
    first = value(1, SLOT)
    tier.put([key(1)], [first])
    offset = slot_offset(direct_dir, key(1))
    tier.close()
    gen = int.from_bytes(
        (direct_dir / "slots-0000.kvf").read_bytes()[offset + 40 : offset + 48], "little"
    )
    other = value(7, SLOT)  # a second copy, as a crash mid-overwrite could leave
    other_gen = gen + 5 if newer_second else gen - 1
    header = encode_header(SlotHeader(key(1), SLOT, checksum(other), other_gen))
    copy_at = offset + SLOT_BYTES if offset == 0 else 0
    write_at(direct_dir, copy_at, header + bytes(HEADER_BLOCK - len(header)) + other)
    expected = other if newer_second else first
    for _ in range(2):  # the loser is wiped at the first open, so the second sees one copy
        tier = open_tier(direct_dir, slots=4)
        try:
            assert tier.keys() == [key(1)] and tier.used_blocks == 1
            assert read_all(tier, [key(1)]) == [expected]
        finally:
            tier.close()
    loser = offset if newer_second else copy_at
    data = (direct_dir / "slots-0000.kvf").read_bytes()
    assert data[loser : loser + HEADER_BLOCK] == bytes(HEADER_BLOCK), "loser's header not wiped"


# ---- a real crash ------------------------------------------------------------------------------

CHILD = r"""
import mmap, sys
from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.disk import DiskTier
from kvferry.config.models import DiskTierConfig
from kvferry.testing.tier_kit import key, value

path, direct, slot = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
config = DiskTierConfig(path=path, capacity=32 * (4096 + slot), direct_io=direct, io_threads=2)
tier = DiskTier(config, TierContext(slot_size=slot))

def source(j):
    data = value(j, slot - (j % 4) * 1000)
    if j % 2:
        return data
    buf = mmap.mmap(-1, len(data))  # page aligned: the zero-copy path
    buf[:] = data
    return memoryview(buf)

def say(tag, j):
    sys.stdout.write(f"{tag} {j}\n")  # one write call: a kill never leaves half a line
    sys.stdout.flush()

live, i = [], 0
while True:
    batch = [i, i + 1, i + 2]
    status = tier.put([key(j, 8) for j in batch], [source(j) for j in batch])
    for j, s in zip(batch, status):
        if s is PutStatus.STORED:
            live.append(j)
            say("P", j)
    i += 3
    while len(live) > 20:
        j = live.pop(0)
        say("X", j)  # delete started: the block may or may not survive a kill
        tier.delete([key(j, 8)])
        say("D", j)
"""


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_sigkilled_writer_leaves_only_exact_blocks(direct_dir: Path, direct: bool) -> None:
    slot = 4 * ALIGN
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(direct_dir), "1" if direct else "0", str(slot)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        while sum(line.startswith("P") for line in lines) < 90:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer exited early:\n{proc.stderr.read()}")
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        rest = proc.stdout.read()  # through the pipe's buffer, which readline filled ahead
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    reports: dict[str, set[int]] = {"P": set(), "X": set(), "D": set()}
    for line in ("".join(lines) + rest).split("\n")[:-1]:  # complete lines only
        tag, number = line.split()
        reports[tag].add(int(number))
    put, deleting, deleted = reports["P"], reports["X"], reports["D"]
    assert deleted, "the writer deleted nothing before the kill; the test is too short"

    def expected(j: int) -> bytes:
        return value(j, slot - (j % 4) * 1000)

    tier = open_tier(direct_dir, slots=32, slot_size=slot, direct=direct)
    try:
        present = tier.keys()
        index = {key(j, 8): j for j in range(max(put) + 4)}
        assert all(k in index for k in present), "a key the writer never wrote"
        got = dict(zip(present, read_all(tier, present, slot)))
        for k, data in got.items():
            assert data is None or data == expected(index[k]), "served wrong bytes after a crash"
        for j in put - deleting:
            assert got.get(key(j, 8)) == expected(j), f"completed put {j} lost or damaged"
        for j in deleted:
            assert key(j, 8) not in got, f"completed delete {j} undone by the crash"
    finally:
        tier.close()


# ---- threads -----------------------------------------------------------------------------------


def test_reads_racing_deletes_never_see_a_reused_slot(direct_dir: Path) -> None:
    """Readers and a writer that deletes and re-puts the same keys (into whatever slot is free).
    A read either misses or returns that key's exact bytes, and a race is never taken for
    corruption."""
    tier = open_tier(direct_dir, slots=6, io_threads=2)
    keys = [key(i, 9) for i in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            for r in range(150):
                k = r % 4
                tier.put([keys[k]], [value(k, SLOT - 64 * (r % 3))])
                tier.delete([keys[(k + 2) % 4]])
        except BaseException as e:  # re-raised below
            errors.append(e)
        finally:
            stop.set()

    def reader() -> None:
        try:
            while not stop.is_set():
                for i, data in enumerate(read_all(tier, keys)):
                    if data is not None and data != value(i, len(data)):
                        raise AssertionError(f"key {i} read another block's bytes")
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in "ab"]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        assert tier.stats().extra["corrupt_dropped"] == 0
        assert tier.used_blocks <= 4
    finally:
        tier.close()


# ---- fallback, errors, close -------------------------------------------------------------------


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.fail("no /dev/shm: the buffered-fallback test needs a tmpfs there")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="kvferry-disk-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _refuse_o_direct(real_open: Callable[..., int]) -> Callable[..., int]:
    def fake_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    return fake_open


def test_buffered_fallback_on_a_filesystem_without_o_direct(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """tmpfs refused O_DIRECT before Linux 6.6; where this kernel's tmpfs takes it, the refusal
    (EINVAL at open, as the older tmpfs gave) is played by os.open for the tier's open only."""
    caplog.set_level(logging.WARNING, logger="kvferry.backends.disk")
    with monkeypatch.context() as m:
        if _takes_o_direct(shm_dir):
            m.setattr(os, "open", _refuse_o_direct(os.open))
        tier = open_tier(shm_dir, direct=True)
    try:
        assert tier.stats().extra["direct_io"] == 0.0
        warnings = [r for r in caplog.records if "O_DIRECT is not supported" in r.getMessage()]
        assert len(warnings) == 1 and str(shm_dir) in warnings[0].getMessage()
        vals = [value(i, SLOT - i) for i in range(4)]
        assert tier.put([key(i) for i in range(4)], vals) == [PutStatus.STORED] * 4
        assert read_all(tier, [key(i) for i in range(4)]) == vals
    finally:
        tier.close()


def test_direct_io_off_by_config_is_reported_without_a_warning(
    direct_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kvferry.backends.disk")
    tier = open_tier(direct_dir, direct=False)
    try:
        assert tier.stats().extra["direct_io"] == 0.0
        assert not caplog.records
    finally:
        tier.close()


def test_io_error_raises_storage_error_naming_tier_and_file(direct_dir: Path) -> None:
    tier = open_tier(direct_dir, direct=False)
    try:
        # the slot file's descriptor becomes read-only underneath the tier: writes get EBADF
        read_only = os.open(direct_dir / "slots-0000.kvf", os.O_RDONLY)
        os.dup2(read_only, tier._fds[0])
        os.close(read_only)
        with pytest.raises(StorageError) as info:
            tier.put([key(1)], [value(1, 100)])
        message = str(info.value)
        assert "'disk'" in message and "slots-0000.kvf" in message
        assert isinstance(info.value.__cause__, OSError)
        assert tier.contains([key(1)]) == [False], "a failed write must not publish the key"
        assert tier.used_blocks == 0
    finally:
        tier.close()


def test_io_errors_in_a_batch_fail_the_batch_and_publish_nothing(direct_dir: Path) -> None:
    """Several blocks per call (the pipelined paths): a write or read error in any of them is a
    StorageError naming the file, and the tier's books stay right."""
    tier = open_tier(direct_dir, direct=False, io_threads=2)
    path = direct_dir / "slots-0000.kvf"
    keys = [key(i, 12) for i in range(5)]
    try:
        assert tier.put(keys[:3], [value(i, 100) for i in range(3)]) == [PutStatus.STORED] * 3
        real = os.dup(tier._fds[0])
        read_only = os.open(path, os.O_RDONLY)
        os.dup2(read_only, tier._fds[0])  # writes get EBADF
        os.close(read_only)
        with pytest.raises(StorageError, match=r"slots-0000\.kvf") as info:
            tier.put(keys[3:], [value(i, 100) for i in range(3, 5)])
        assert "write failed for 2 block(s)" in str(info.value)
        assert tier.contains(keys) == [True] * 3 + [False] * 2
        write_only = os.open(path, os.O_WRONLY)
        os.dup2(write_only, tier._fds[0])  # reads get EBADF
        os.close(write_only)
        with pytest.raises(StorageError, match="read failed for 3 block") as info:
            tier.get(keys[:3], [memoryview(bytearray(SLOT)) for _ in range(3)])
        assert isinstance(info.value.__cause__, OSError)
        assert tier.stats().extra["corrupt_dropped"] == 0, "an I/O error is not corruption"
        os.dup2(real, tier._fds[0])
        os.close(real)
        assert read_all(tier, keys) == [value(i, 100) for i in range(3)] + [None, None]
        assert tier.used_blocks == 3
    finally:
        tier.close()


def test_reads_in_flight_never_exceed_io_threads(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verifier runs beside the readers, not as another reader: the depth of I/O that
    io_threads promises (what disk_vs_fio.py compares with fio's iodepth) holds. os.preadv is
    wrapped to count, the reads themselves are real."""
    real = os.preadv
    lock = threading.Lock()
    now, peak = [0], [0]

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            return real(fd, buffers, offset)
        finally:
            with lock:
                now[0] -= 1

    for io_threads in (1, 2):
        tier = open_tier(direct_dir / f"t{io_threads}", slots=24, io_threads=io_threads)
        try:
            keys = [key(i, 13) for i in range(24)]
            vals = [value(i, SLOT) for i in range(24)]
            assert tier.put(keys, [aligned(v) for v in vals]) == [PutStatus.STORED] * 24
            peak[0] = 0
            with monkeypatch.context() as m:
                m.setattr(os, "preadv", counting)
                for _ in range(3):
                    assert read_all(tier, keys) == vals
            assert 1 <= peak[0] <= io_threads, f"{peak[0]} reads in flight, io_threads={io_threads}"
        finally:
            tier.close()


def test_bad_input_and_closed_tier(direct_dir: Path) -> None:
    tier = open_tier(direct_dir)
    tier.put([key(1)], [value(1, 100)])
    with pytest.raises(ValueError, match="16 bytes"):
        tier.put([b"short"], [b"x"])
    with pytest.raises(ValueError, match="read-only"):
        tier.get([key(1)], [memoryview(bytes(SLOT))])
    with pytest.raises(ValueError, match="values"):
        tier.put([key(2)], [])
    tier.close()
    tier.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        tier.contains([key(1)])
    with pytest.raises(StorageError, match="closed"):
        tier.get([key(1)], [memoryview(bytearray(SLOT))])


def test_files_are_preallocated_and_capacity_spread(direct_dir: Path) -> None:
    tier = open_tier(direct_dir, slots=10, files=3)
    try:
        sizes = sorted((direct_dir / f"slots-{i:04d}.kvf").stat().st_size for i in range(3))
        assert sizes == [3 * SLOT_BYTES, 3 * SLOT_BYTES, 4 * SLOT_BYTES]
        blocks = [(direct_dir / f"slots-{i:04d}.kvf").stat().st_blocks for i in range(3)]
        assert all(b * 512 >= 3 * SLOT_BYTES for b in blocks), "files are sparse, not allocated"
        stats = tier.stats()
        assert (stats.total_blocks, stats.total_bytes) == (10, 10 * SLOT)
        assert stats.extra["io_threads"] == 4.0
    finally:
        tier.close()


def test_a_capacity_above_the_free_space_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    where = tmp_path / "not-yet" / "slots"
    config = DiskTierConfig(path=str(where), capacity=free + (64 << 30))
    with pytest.raises(ConfigError) as refused:
        DiskTier(config, TierContext(slot_size=SLOT))
    message = str(refused.value)
    assert "disk.capacity" in message and "free" in message and str(where) in message
    assert "disk.force_capacity" in message and "--force-capacity" in message
    assert not (tmp_path / "not-yet").exists()  # no directory made, no file preallocated


def test_space_already_held_by_the_slot_files_counts_as_available(tmp_path: Path) -> None:
    tier = open_tier(tmp_path, slots=64)
    tier.close()
    # Reopening asks for no new space: the check passes however full the disk is now.
    slot_bytes = HEADER_BLOCK + SLOT
    config = DiskTierConfig(path=str(tmp_path), capacity=64 * slot_bytes)
    DiskTier.check(config, TierContext(slot_size=SLOT))
    assert bytes_to_preallocate(config, TierContext(slot_size=SLOT)) == 0
    bigger = config.model_copy(update={"capacity": 128 * slot_bytes, "path": str(tmp_path / "b")})
    assert bytes_to_preallocate(bigger, TierContext(slot_size=SLOT)) == 128 * slot_bytes


def test_a_disk_path_under_a_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = DiskTierConfig(path=str(blocker / "slots"), capacity=1 << 20, force_capacity=True)
    with pytest.raises(ConfigError, match=r"disk\.path .* is not a directory"):
        DiskTier.check(config, TierContext(slot_size=SLOT))
