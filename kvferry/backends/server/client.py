"""The server tier: kvferry store servers (``kvferry serve store``) as a shared remote tier.

Blocks are spread over the servers by consistent hashing (``ring``), by prefix chunk and on
``server.replicas`` servers each (``placement``: the store tells the tier which keys form a chain,
``note_chain``; reads ask a block's servers in turn until one has it); the member list comes from
``server.addresses`` and from the leases the servers keep in Redis (``server.membership_url``,
``membership``), re-read every ``server.membership_poll`` seconds by a watcher thread, so a
tier call never waits on Redis. Each thread keeps one connection per server (a call is one
request/reply on it). A call whose blocks live on several servers asks them in parallel
(``server.fanout``), so it takes as long as its slowest share.

Failure is partial. A call that fails on the wire (refused, reset, timed out after
``server.timeout``) marks that server down at once: the ring is rebuilt without it, so the very
next call no longer asks it, and its keys fall to the next live owner on the ring. The failed
call itself goes on: its blocks on that server are asked of their next server (a replica), else
are misses (``down_misses``), and puts meant for it are sent to the next live owner
(``put_rerouted``; ``put_dropped`` counts blocks no live server took). A down server comes back
when the watcher's probe (a handshake, every poll) succeeds or the membership shows a new
instance of it (a restart); a server whose lease expired leaves the member list. Only when no
server is live does a call raise :class:`StorageError` (the store's circuit breaker then skips
the tier); then every known server is asked again, so one that returns is found by the next call.
An ERR reply does not mark a server down: it is answered, and its blocks are misses (or the call
raises, if no server answered at all).

Data paths, picked per server:
- same host (``transport: auto`` and the server's handshake shows our boot id): LOCATE pins the
  blocks and gives their offsets in the server's pool, the bytes are copied straight out of the
  shared mapping, RELEASE unpins (put: RESERVE, copy in, COMMIT);
- otherwise inline over tcp: GET's reply carries the bytes, received straight into the caller's
  buffers (no staging copy); PUT carries them in the request.

Every block a server lends comes with its checksum (``protocol``): the bytes received (tcp) or
copied out of the shared pool (same host) are checked against it, and a block that does not match
is a miss, counted (``corrupt``), and reported to the server with CHECK so that it re-checks and
drops it. A put through the shared pool declares each block's checksum at COMMIT.

Connections, framing and same-host mappings are ``conns``'s: any socket failure closes that
connection (a half-read reply must never be parsed as the next one) and the next call reconnects.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from kvferry.backends.base import (
    Buffer,
    Key,
    PutStatus,
    Tier,
    TierContext,
    TierStats,
    block_checksum,
)
from kvferry.backends.server import protocol as p
from kvferry.backends.server.conns import (
    Connections,
    ServerRefused,
    Unreachable,
    parse_address,
)
from kvferry.backends.server.membership import read_members
from kvferry.backends.server.placement import Placement
from kvferry.backends.server.ring import HashRing
from kvferry.config.models import ServerTierConfig
from kvferry.errors import ConfigError, KvferryError, StorageError
from kvferry.observe.logs import RateLimitedLog
from kvferry.transfer import handshake
from kvferry.transfer.memory import PeerMapping

log = logging.getLogger("kvferry.backends.server")
_corrupt_log = RateLimitedLog(log)
_member_log = RateLimitedLog(log)

_T = TypeVar("_T")
_V = TypeVar("_V")

_RANK = {PutStatus.NO_SPACE: 0, PutStatus.REJECTED: 1, PutStatus.EXISTS: 2, PutStatus.STORED: 3}
"""Which of a block's replica answers is its status: the best (one stored copy is readable)."""


class ServerTier(Tier):
    """Client of one or more store servers; see the module docstring."""

    name = "server"
    config_section = "server"
    shared = True

    def __init__(self, config: ServerTierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        self.cfg = config
        token = config.auth_token.get_secret_value() if config.auth_token else None
        self._wire = Connections(token, config.timeout, shm=config.transport == "auto")
        self._lock = threading.Lock()
        self._closed = False
        self._corrupt = 0
        self._down_misses = 0
        self._put_rerouted = 0
        self._put_dropped = 0
        self._member_failures = 0
        self._marked_down = 0
        self._members: list[str] = []
        self._instances: dict[str, str] = {}  # member -> instance id from the membership
        self._down: dict[str, str | None] = {}  # member -> its instance id when marked down
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._placement = Placement(config.chunk_blocks, config.replicas)
        self._ring = self._set_members(self._read_members())
        if self.cfg.membership_url:
            self._start_watcher()

    # -- membership and health ---------------------------------------------------------------
    def _read_members(self) -> dict[str, str]:
        """Members now: the configured addresses ("" instance) and the membership's.

        Raises:
            ConfigError: no member at all, or an address that is not host:port.
            StorageError: the membership Redis cannot be read.
        """
        members = dict.fromkeys(self.cfg.addresses, "")
        if self.cfg.membership_url:
            members.update(
                read_members(self.cfg.membership_url, self.cfg.membership_key, self.cfg.timeout)
            )
        if not members:
            raise ConfigError(
                "server tier: no store server known; set server.addresses (host:port, ...) or "
                "server.membership_url where servers register"
            )
        for m in members:
            parse_address(m)
        return members

    def _set_members(self, members: dict[str, str]) -> HashRing:
        """Adopt a member list; forget down marks of members gone from it or restarted since."""
        with self._lock:
            self._members = sorted(members)
            self._instances = members
            for m, seen in list(self._down.items()):
                if m not in members:
                    del self._down[m]
                elif seen and members[m] and members[m] != seen:
                    del self._down[m]
                    log.info("server tier: store server %s restarted; using it again", m)
            return self._rebuild()

    def _rebuild(self) -> HashRing:
        """The ring over the live members (over all when none is live); under the lock."""
        live = [m for m in self._members if m not in self._down]
        self._ring = HashRing(live or self._members, self.cfg.virtual_nodes)
        return self._ring

    def _mark_down(self, member: str, error: BaseException) -> None:
        """Stop routing to ``member`` at once (a call to it failed on the wire)."""
        with self._lock:
            if member in self._down or member not in self._members:
                return
            self._down[member] = self._instances.get(member) or None
            self._marked_down += 1
            self._rebuild()
            others = any(m not in self._down for m in self._members)
        if others:
            _member_log.warning(
                "down",
                "server tier: store server %s is down (%s); its blocks read as misses and its "
                "puts go to the next live server until it is back",
                member,
                error.__cause__ or error,
            )
        else:  # no server left: the call fails with its own error, one line is enough
            log.info("server tier: store server %s is down (%s)", member, error.__cause__ or error)
        self._start_watcher()

    def _mark_up(self, member: str) -> None:
        with self._lock:
            if member not in self._down:
                return
            del self._down[member]
            self._rebuild()
        log.info("server tier: store server %s answers again; using it", member)

    def _live(self) -> bool:
        """Whether some member is not marked down."""
        with self._lock:
            return len(self._down) < len(self._members)

    def down_members(self) -> list[str]:
        """The members this client marked down and has not seen back yet."""
        with self._lock:
            return sorted(self._down)

    def _start_watcher(self) -> None:
        with self._lock:
            if self._watcher is not None or self._closed:
                return
            # The thread holds the tier weakly: a tier dropped without close() still goes away.
            self._watcher = threading.Thread(
                target=_watch,
                args=(weakref.ref(self), self._stop, self.cfg.membership_poll),
                name="kvferry-server-members",
                daemon=True,
            )
            self._watcher.start()

    def _watch_once(self) -> None:
        """One poll: re-read the membership, then probe each member marked down."""
        if self.cfg.membership_url:
            try:
                members = self._read_members()
            except (StorageError, ConfigError) as e:
                # An empty membership (every lease expired) keeps the old list: its servers are
                # down, and the calls that find them so raise, which the store's breaker skips.
                _member_log.warning("poll", "server tier: keeping the old member list: %s", e)
            else:
                self._set_members(members)
        with self._lock:
            down = list(self._down)
        for member in down:
            if self._stop.is_set():
                return
            try:
                sock, _peer = self._wire.open(member)
            except StorageError:
                continue
            sock.close()
            self._mark_up(member)

    def _each(
        self, shares: dict[str, list[int]], call: Callable[[str, list[int]], _T]
    ) -> tuple[list[tuple[str, list[int], _T]], list[int]]:
        """Run ``call(member, indexes)`` for each member's share (member -> indexes).

        Returns:
            ([(member, indexes, result)] of the members that answered, indexes whose member
            failed).

        Raises:
            StorageError: no member answered and either none is live any more or none failed
                on the wire (an ERR reply from every one): the tier as a whole failed.
            ValueError: the caller's buffers (raised by ``call``).
        """
        answered: list[tuple[str, list[int], _T]] = []
        failed: list[int] = []
        first: StorageError | None = None
        downed = False
        bug: BaseException | None = None
        for member, idx, outcome in self._fan(shares, call):
            if isinstance(outcome, Unreachable):
                self._mark_down(member, outcome)
                downed = True
                first = first or outcome
                failed.extend(idx)
            elif isinstance(outcome, StorageError):
                _member_log.warning("err", "server tier: %s", outcome)
                first = first or outcome
                failed.extend(idx)
            elif isinstance(outcome, BaseException):
                bug = bug or outcome  # the caller's buffers (ValueError), or a bug: raised
            else:
                answered.append((member, idx, outcome))
                if member in self._down:
                    self._mark_up(member)  # asked because no member was live: it answered
        if bug is not None:
            raise bug
        if failed:
            with self._lock:
                self._member_failures += 1
        if first is not None and not answered and not (downed and self._live()):
            raise StorageError(str(first)) from first
        return answered, failed

    def _fan(
        self, shares: dict[str, list[int]], call: Callable[[str, list[int]], _T]
    ) -> list[tuple[str, list[int], _T | BaseException]]:
        """``call(member, indexes)`` for every share, at most ``server.fanout`` at once: this
        thread does the first share while the pool does the others (each pool thread keeps its
        own connections, as every thread does). Each outcome is the result or the exception."""

        def one(member: str, idx: list[int]) -> _T | BaseException:
            try:
                return call(member, idx)
            except Exception as e:  # sorted out by _each, which knows what each kind means
                return e

        def outcome(f: Future[_T | BaseException]) -> _T | BaseException:
            try:
                return f.result()
            except CancelledError:  # close() cancelled it before it ran
                return StorageError("server tier is closed")

        items = list(shares.items())
        pool = self._fan_pool() if len(items) > 1 else None
        if pool is None:
            return [(m, idx, one(m, idx)) for m, idx in items]
        try:
            futures = [pool.submit(one, m, idx) for m, idx in items[1:]]
        except RuntimeError:  # the pool was shut down: the tier closed meanwhile
            raise StorageError("server tier is closed") from None
        head = one(*items[0])
        return [(items[0][0], items[0][1], head)] + [
            (m, idx, outcome(f)) for (m, idx), f in zip(items[1:], futures)
        ]

    def _fan_pool(self) -> ThreadPoolExecutor | None:
        """The fan-out pool (made on first use), or None when calls go one after another."""
        if self.cfg.fanout <= 1:
            return None
        with self._lock:
            if self._pool is None and not self._closed:
                self._pool = ThreadPoolExecutor(
                    self.cfg.fanout - 1, thread_name_prefix="kvferry-server-fanout"
                )
            return self._pool

    def _skip(self) -> set[str]:
        """Members a call passes over: those marked down, unless every member is (then all are
        asked, so that one that is back is found)."""
        with self._lock:
            down = self._down
            return set(down) if len(down) < len(self._members) else set()

    def _read(
        self, keys: Sequence[Key], call: Callable[[str, list[int]], list[_V | None]]
    ) -> list[_V | None]:
        """Ask each key's readers (``placement``) in turn until one has it: first its first
        writer, then (for the keys not found yet, round by round) its next writer or fallback
        server not marked down. ``call(member, indexes)`` answers per index, None where that
        server does not have it.

        Raises:
            StorageError: the first round failed as a whole (see ``_each``).
        """
        ring, place = self._ring, self._placement
        writers = place.writers(ring, keys)
        res: list[_V | None] = [None] * len(keys)
        shares: dict[str, list[int]] = {}
        for i, w in enumerate(writers):
            shares.setdefault(w[0], []).append(i)
        answered, failed = self._each(shares, call)
        for _m, idx, got in answered:
            for i, v in zip(idx, got):
                if v is not None:
                    res[i] = v
        lost = set(failed)  # asked of a server that failed
        # Later rounds, for misses only: the next replica, then the own key's owners.
        rest: dict[int, list[str]] = {}
        for i, v in enumerate(res):
            if v is None:
                more = writers[i][1:] + place.fallback(ring, keys[i], writers[i])
                if more:
                    rest[i] = more
        while rest:
            skip = self._skip()
            shares = {}
            for i, more in list(rest.items()):
                while more and more[0] in skip:
                    more.pop(0)
                if not more:
                    del rest[i]
                    continue
                shares.setdefault(more.pop(0), []).append(i)
            if not shares:
                break
            try:
                answered, failed = self._each(shares, call)
            except StorageError:
                break  # what the first round found stands; the rest are misses
            lost.update(failed)
            for _m, idx, got in answered:
                for i, v in zip(idx, got):
                    if v is not None:
                        res[i] = v
                        rest.pop(i, None)
            for i in [i for i, more in rest.items() if not more]:
                del rest[i]
        self._count_misses(sum(1 for i in lost if res[i] is None))
        return res

    def note_chain(self, keys: Sequence[Key], depth: int) -> None:
        """Remember where the blocks of this chain go (``server.chunk_blocks``; ``placement``)."""
        self._placement.note_chain(keys, depth)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def capacity_blocks(self) -> None:
        return None

    @property
    def used_blocks(self) -> int:
        return self.stats().used_blocks

    # -- primitives -------------------------------------------------------------------------
    def contains(self, keys: Sequence[Key]) -> list[bool]:
        def ask(member: str, idx: list[int]) -> list[bool | None]:
            ks = p.encode_keys([keys[i] for i in idx])
            reply = self._wire.call(member, p.Method.CONTAINS, [ks])
            if len(reply) != len(idx):
                raise StorageError(f"server tier: {member} sent a malformed CONTAINS reply")
            return [True if b == 1 else None for b in reply]

        return [v is not None for v in self._read(keys, ask)]

    def _count_misses(self, n: int) -> None:
        if n:
            with self._lock:
                self._down_misses += n

    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        limit = self.context.slot_size
        for v in values:
            if len(v) > limit:
                raise ValueError(
                    f"server tier: a {len(v)}-byte block is larger than store.slot_size ({limit})"
                )
        out = [PutStatus.NO_SPACE] * len(keys)

        def put_member(member: str, idx: list[int]) -> list[PutStatus]:
            ks = [keys[i] for i in idx]
            vs = [values[i] for i in idx]
            mapping = self._wire.mapping(member)
            if mapping is not None:
                return self._put_shm(member, mapping, ks, vs)
            head = p.encode_keys(ks) + p.encode_u32s([len(v) for v in vs])
            reply = self._wire.call(member, p.Method.PUT, [head, *vs])
            return p.decode_statuses(reply, len(ks))

        # Each block to its writers (``server.replicas`` of them, on the live ring); the best
        # answer of its writers is its status (one replica that stored it makes it readable).
        ring = self._ring
        writers = self._placement.writers(ring, keys)
        done: list[list[str]] = [[] for _ in keys]  # the writers that answered, per block
        shares: dict[str, list[int]] = {}
        for i, ws in enumerate(writers):
            for m in ws:
                shares.setdefault(m, []).append(i)

        def merge(answered: list[tuple[str, list[int], list[PutStatus]]]) -> set[int]:
            landed: set[int] = set()
            for member, idx, got in answered:
                for i, st in zip(idx, got):
                    done[i].append(member)
                    landed.add(i)
                    if _RANK[st] > _RANK[out[i]]:
                        out[i] = st
            return landed

        answered, failed = self._each(shares, put_member)
        merge(answered)
        rerouted = 0
        # A server that failed on the wire is out of the ring now: its share goes to the next
        # live owner (a block's writers on the new ring that do not have it yet), once per ring
        # change (at most once per member).
        for _ in range(len(self._members)):
            if not failed or self._ring is ring:
                break
            ring = self._ring
            left = sorted(set(failed))
            shares = {}
            for i, ws in zip(left, self._placement.writers(ring, [keys[j] for j in left])):
                for m in ws:
                    if m not in done[i]:
                        shares.setdefault(m, []).append(i)
            if not shares:
                break
            try:
                more, failed = self._each(shares, put_member)
            except StorageError:
                break  # no live server left: what failed is dropped
            rerouted += len(merge(more))
        dropped = sum(1 for d in done if not d)
        if dropped or rerouted:
            with self._lock:
                self._put_dropped += dropped
                self._put_rerouted += rerouted
        return out

    def _put_shm(
        self, member: str, mapping: PeerMapping, ks: list[Key], vs: list[Buffer]
    ) -> list[PutStatus]:
        reply = self._wire.call(
            member, p.Method.RESERVE, [p.encode_keys(ks), p.encode_u32s([len(v) for v in vs])]
        )
        if len(reply) != p.LEASE_REGION.size + p.RES.size * len(ks):
            raise StorageError(f"server tier: {member} sent a malformed RESERVE reply")
        lease, _region = p.LEASE_REGION.unpack_from(reply, 0)
        status: list[PutStatus] = []
        ok = bytearray(len(ks))
        sums: list[int] | None = None  # only when a slot is guarded (rare)
        view, size, stored, code_status = (
            mapping.view,
            mapping.size,
            PutStatus.STORED,
            p.CODE_STATUS,
        )
        entries = p.RES.iter_unpack(memoryview(reply)[p.LEASE_REGION.size :])
        for i, ((code, offset, declare), k, v) in enumerate(zip(entries, ks, vs)):
            s = code_status.get(code, PutStatus.NO_SPACE)
            status.append(s)
            if s is stored:
                n = len(v)
                if offset + n > size:
                    raise StorageError(f"server tier: {member} reserved outside its pool")
                view[offset : offset + n] = v
                if declare:  # a guarded slot: of what we meant to write, not of the slot
                    if sums is None:
                        sums = [0] * len(ks)
                    sums[i] = block_checksum(k, v)
                ok[i] = 1
        if not lease:
            return status
        declared = p.encode_u64s(sums) if sums is not None else bytes(8 * len(ks))
        final = self._wire.call(member, p.Method.COMMIT, [p.U64.pack(lease), bytes(ok), declared])
        return p.decode_statuses(final, len(ks))

    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        def get_member(member: str, idx: list[int]) -> list[int | None]:
            ks = [keys[i] for i in idx]
            os_ = [outs[i] for i in idx]
            mapping = self._wire.mapping(member)
            if mapping is None:
                return self._get_inline(member, ks, os_)
            got = self._get_shm(member, mapping, ks, os_)
            # LOCATE lends only blocks it can pin in the server's cpu tier; the others
            # (a batch larger than that tier, blocks on its disk) come inline.
            again = [j for j, n in enumerate(got) if n is None]
            if again:
                more = self._get_inline(member, [ks[j] for j in again], [os_[j] for j in again])
                for j, n in zip(again, more):
                    got[j] = n
            return got

        # A failed server's blocks are asked of their next reader, else stay None (misses);
        # what a failed server wrote into outs is overwritten or not read.
        return self._read(keys, get_member)

    def _get_inline(self, member: str, ks: list[Key], outs: list[memoryview]) -> list[int | None]:
        too_small: str | None = None
        try:
            conn, total = self._wire.request(member, p.Method.GET, [p.encode_keys(ks)])
            n_keys = len(ks)
            table = handshake.recv_exact(conn.sock, 1 + 4 * n_keys)
            flags = table[0]
            lengths = list(memoryview(table)[1:].cast("I"))
            sums: list[int | None] = []
            if flags & p.SUMS:
                checks = memoryview(handshake.recv_exact(conn.sock, 9 * n_keys))
                sums, _ = p.decode_checks(checks, 0, n_keys)
            body = sum(n for n in lengths if n != p.MISS)
            if 1 + (13 if sums else 4) * n_keys + body != total:
                raise StorageError(f"server tier: {member} sent a malformed GET reply")
            got: list[int | None] = []
            sock = conn.sock
            for n, out in zip(lengths, outs):
                if n == p.MISS:
                    got.append(None)
                    continue
                # Straight into the caller's buffer: the reply bytes are copied once, by recv.
                target = out if len(out) >= n else memoryview(bytearray(n))
                if target is not out and too_small is None:
                    too_small = (
                        f"server tier: output buffer of {len(out)} bytes is smaller than the "
                        f"{n}-byte block"
                    )
                view = target[:n]
                have = 0
                while have < n:
                    k = sock.recv_into(view[have:], n - have)
                    if k == 0:
                        raise OSError("store server closed the connection mid-reply")
                    have += k
                got.append(n)
            conn.used = True
        except ServerRefused as e:
            raise StorageError(str(e)) from None
        except StorageError:  # from _conn (which names the server), or a malformed reply
            self._wire.drop(member)
            raise
        except (OSError, KvferryError) as e:
            self._wire.drop(member)
            raise Unreachable(f"server tier: store server {member}: {e}") from e
        if too_small is not None:
            raise ValueError(too_small)
        if sums:
            self._check(member, ks, outs, got, sums)
        return got

    def _check(
        self,
        member: str,
        ks: list[Key],
        outs: Sequence[memoryview],
        got: list[int | None],
        sums: Sequence[int | None],
    ) -> None:
        """Check each received block the server asked to check (its slot is guarded) against
        its checksum; a mismatch becomes a miss (in ``got``), is counted, and is reported to
        the server (CHECK), which re-checks it."""
        bad: list[Key] = []
        for j, (k, out, n) in enumerate(zip(ks, outs, got)):
            want = sums[j]
            if n is not None and want is not None and block_checksum(k, out[:n]) != want:
                got[j] = None
                bad.append(k)
        if not bad:
            return
        with self._lock:
            self._corrupt += len(bad)
        _corrupt_log.warning(
            "corrupt",
            "server tier: %d block(s) from %s failed their checksum; read as misses",
            len(bad),
            member,
        )
        try:
            self._wire.call(member, p.Method.CHECK, [p.encode_keys(bad)])
        except StorageError as e:
            log.warning("server tier: asking %s to re-check blocks failed: %s", member, e)

    def _get_shm(
        self, member: str, mapping: PeerMapping, ks: list[Key], outs: list[memoryview]
    ) -> list[int | None]:
        for out in outs:
            if len(out) < 1:
                raise ValueError("server tier: an output buffer is empty")
        reply = self._wire.call(member, p.Method.LOCATE, [p.encode_keys(ks)])
        size = p.LOCATE_HEAD.size + p.LOC.size * len(ks)
        lease, _region, flags = p.LOCATE_HEAD.unpack_from(reply, 0)
        if len(reply) != size + (9 * len(ks) if flags & p.SUMS else 0):
            raise StorageError(f"server tier: {member} sent a malformed LOCATE reply")
        sums: list[int | None] = []
        if flags & p.SUMS:
            sums, _ = p.decode_checks(memoryview(reply), size, len(ks))
        pos = p.LOCATE_HEAD.size
        view = mapping.view
        got: list[int | None] = []
        error: str | None = None
        for out in outs:
            offset, n = p.LOC.unpack_from(reply, pos)
            pos += p.LOC.size
            if n == p.MISS:
                got.append(None)
            elif offset + n > mapping.size:
                error = f"server tier: {member} located a block outside its pool"
                got.append(None)
            elif len(out) < n:
                error = (
                    f"server tier: output buffer of {len(out)} bytes is smaller than the "
                    f"{n}-byte block"
                )
                got.append(None)
            else:
                out[:n] = view[offset : offset + n]
                got.append(n)
        if lease:
            self._wire.call(member, p.Method.RELEASE, [p.U64.pack(lease)])
        if error is not None:
            if "smaller" in error:
                raise ValueError(error)
            raise StorageError(error)
        if sums:
            self._check(member, ks, outs, got, sums)
        return got

    def delete(self, keys: Sequence[Key]) -> int:
        """Delete ``keys`` wherever a read could find them (every reader of each); the number
        deleted from each key's first reader."""

        def delete_member(member: str, idx: list[int]) -> int:
            ks = p.encode_keys([keys[i] for i in idx])
            reply = self._wire.call(member, p.Method.DELETE, [ks])
            return int(p.U32.unpack(reply)[0])

        readers = self._placement.readers(self._ring, keys)
        skip = self._skip()
        counted: dict[str, list[int]] = {}  # each key's first reader: the count
        others: dict[str, list[int]] = {}  # its other readers (replicas, own-key owners)
        for i, rs in enumerate(readers):
            live = [m for m in rs if m not in skip]
            for j, m in enumerate(live):
                (counted if j == 0 else others).setdefault(m, []).append(i)
        answered, _failed = self._each(counted, delete_member)
        if others:
            try:
                self._each(others, delete_member)
            except StorageError as e:
                log.warning("server tier: deleting other copies failed: %s", e)
        return sum(n for _, _, n in answered)

    def _live_members(self) -> list[str]:
        with self._lock:
            live = [m for m in self._members if m not in self._down]
            return live or list(self._members)

    def _ask_each(self, method: p.Method) -> dict[str, bytearray]:
        """``method`` (no payload) of every live server, by address; a server that fails is
        left out (and marked down when it failed on the wire).

        Raises:
            StorageError: no server answered.
        """
        replies: dict[str, bytearray] = {}
        first: StorageError | None = None
        for member in self._live_members():
            try:
                replies[member] = self._wire.call(member, method, [])
            except Unreachable as e:
                self._mark_down(member, e)
                first = first or e
            except StorageError as e:
                first = first or e
        if first is not None and not replies:
            raise StorageError(str(first)) from first
        return replies

    def keys(self) -> list[Key]:
        out: dict[Key, None] = {}  # a replicated block once
        for reply in self._ask_each(p.Method.KEYS).values():
            ks, _ = p.decode_keys(memoryview(reply))
            out.update(dict.fromkeys(ks))
        return list(out)

    def server_stats(self) -> dict[str, dict[str, Any]]:
        """Each live server's StoreStats as JSON, by address."""
        return {m: json.loads(bytes(r)) for m, r in self._ask_each(p.Method.STATS).items()}

    def stats(self) -> TierStats:
        used = total = peak = 0
        for doc in self.server_stats().values():
            usage = doc.get("usage", {})
            first: dict[str, Any] = (
                next(iter(usage.values()), {}) if isinstance(usage, dict) else {}
            )
            used += int(first.get("used_blocks", 0))
            total += int(first.get("total_blocks") or 0)
            peak += int(first.get("peak_blocks", 0))
        with self._lock:
            extra = {
                "servers": float(len(self._members)),
                "servers_down": float(len(self._down)),
                "server_slots": float(total),
                "corrupt": float(self._corrupt),
                "down_misses": float(self._down_misses),
                "put_rerouted": float(self._put_rerouted),
                "put_dropped": float(self._put_dropped),
                "failed_calls": float(self._member_failures),
                "marked_down": float(self._marked_down),
            }
        return TierStats(total_blocks=None, used_blocks=used, peak_blocks=peak, extra=extra)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watcher = self._watcher
            pool, self._pool = self._pool, None
        self._stop.set()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=self.cfg.timeout + 1)
        self._wire.close()


def _watch(ref: weakref.ref[ServerTier], stop: threading.Event, interval: float) -> None:
    """The watcher thread: ``_watch_once`` every ``interval`` s until ``stop`` or the tier is
    gone. An isolation boundary: a failed poll is logged and the next one retries."""
    while not stop.wait(interval):
        tier = ref()
        if tier is None:
            return
        try:
            tier._watch_once()
        except Exception as e:
            _member_log.warning("watch", "server tier: membership poll failed: %s", e)
        del tier
