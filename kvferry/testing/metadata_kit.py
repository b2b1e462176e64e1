"""The metadata-service conformance kit: checks every service in ``METADATA`` must pass.

A service's tests (``tests/transfer/test_metadata_kit.py`` runs every registered one) call::

    check_metadata(RedisMetadata, MetadataConfig(url=live_url, key_prefix=unique), unreachable)

which runs every check below against the live service the config points at (nothing is faked:
a Redis service talks to a real redis-server). Each check publishes names of its own under the
config's ``key_prefix`` and removes them; a failure raises ``AssertionError`` naming the check,
the service and the name. The contract is the one ``kvferry.transfer.metadata.base`` states.

Checks for every service:

``check_publish_resolve``
    What is published resolves to exactly that address (host text, int port), IPv6 included,
    from the publishing client and from a second client (the initiator is another process).
``check_unknown_name``
    A name never published (or malformed) raises SegmentError naming it.
``check_unpublish_never_raises``
    Unpublishing a name twice, or one never published, does not raise.
``check_bad_address``
    Publishing an address no peer could reach (empty host, port 0 or 65536) raises
    SegmentError.
``check_concurrent``
    Eight threads publish and resolve names of their own at once; each resolves to its own.
``check_close``
    ``close`` twice does not raise.
``check_unreachable`` (given a config of a service that cannot be reached)
    publish and resolve raise PeerClosed; unpublish does not raise.

Checks for a service that stores names (``names_are_addresses`` false):

``check_free_names``
    Names that are not addresses ("prefill-0", with ':', '/', spaces, non-ASCII) round-trip.
``check_republish_moves``
    Publishing a name again replaces its address.
``check_unpublish_forgets``
    An unpublished name stops resolving.
``check_prefix_isolation``
    A service with another ``key_prefix`` neither sees nor removes the name.
``check_ttl``
    With ``ttl`` the name resolves right after publish and stops resolving once it ran out,
    also for a ttl under a millisecond; with ttl 0 it stays.

Checks for a service whose names are addresses (p2p):

``check_names_are_addresses``
    Each well-formed "host:port" resolves to itself with nothing published, and publish
    refuses a name that would not resolve to the address it is given.

This module owns the checks only; starting a live service (a redis-server) is the test's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvferry.config.models import MetadataConfig
from kvferry.errors import PeerClosed, SegmentError
from kvferry.transfer.metadata.base import MetadataService

__all__ = ["MetadataKit", "check_metadata"]

EXPIRY_WAIT_S = 20.0
"""Generous bound on how long an expired name may still resolve: redis expires keys lazily
on access, so in practice this is milliseconds past the ttl."""

TTL_S = 1.0
"""The ttl of the expiry check: long enough that a loaded machine still resolves the name right
after publishing it."""


@dataclass
class MetadataKit:
    """The conformance checks, bound to one service class and a live service.

    Args:
        cls: the service class under test.
        config: points at a live service of that class (its ``key_prefix`` is the checks' own).
        unreachable: a config for the same class whose service cannot be reached; None skips
            ``check_unreachable`` (a service that talks to no server has nothing to miss).
    """

    cls: type[MetadataService]
    config: MetadataConfig
    unreachable: MetadataConfig | None = None
    _open: list[MetadataService] = field(init=False, default_factory=list)

    # -- helpers ----------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return f"{self.cls.__name__} ({self.cls.name})"

    def service(self, **changes: Any) -> MetadataService:
        """A fresh client of the service under test, its config changed by ``changes``."""
        config = MetadataConfig.model_validate({**self.config.model_dump(), **changes})
        made = self.cls(config)
        self._open.append(made)
        return made

    def _name(self, what: str) -> str:
        return f"kit-{what}-{uuid.uuid4().hex[:8]}"

    def _resolves(
        self, service: MetadataService, name: str, want: tuple[str, int], what: str
    ) -> None:
        got = service.resolve(name)
        assert isinstance(got, tuple) and len(got) == 2, (
            f"{what}: {self.label} resolved {name!r} to {got!r}, not a (host, port) tuple"
        )
        assert isinstance(got[0], str) and type(got[1]) is int, (
            f"{what}: {self.label} resolved {name!r} to {got!r}: host must be str, port int"
        )
        assert got == want, f"{what}: {self.label} resolved {name!r} to {got!r}, not {want!r}"

    def _gone(self, service: MetadataService, name: str, what: str) -> None:
        try:
            got = service.resolve(name)
        except SegmentError as e:
            assert name in str(e), f"{what}: the SegmentError does not name {name!r}: {e}"
            return
        raise AssertionError(f"{what}: {self.label} still resolves {name!r} (to {got!r})")

    def _published_name(self, address: tuple[str, int], what: str) -> str:
        """A name the service can publish ``address`` under: the address itself where names are
        addresses, else a fresh free name."""
        if self.cls.names_are_addresses:
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            return f"{host}:{address[1]}"
        return self._name(what)

    # -- checks for every service -----------------------------------------------------------
    def check_publish_resolve(self) -> None:
        """Published -> resolves to exactly that address, here and from another client."""
        publisher, other = self.service(), self.service()
        for address in (("127.0.0.1", 15428), ("::1", 1), ("node-3.example", 65535)):
            name = self._published_name(address, "publish")
            publisher.publish(name, address, uuid.uuid4().hex)
            self._resolves(publisher, name, address, "publish/resolve")
            self._resolves(other, name, address, "publish/resolve from another client")
            publisher.unpublish(name)

    def check_unknown_name(self) -> None:
        """A name never published raises SegmentError naming it."""
        service = self.service()
        for name in (self._name("unknown"), ""):
            try:
                got = service.resolve(name)
            except SegmentError as e:
                assert repr(name) in str(e) or name in str(e), (
                    f"unknown name: the SegmentError does not name {name!r}: {e}"
                )
            else:
                raise AssertionError(f"unknown name: {self.label} resolved {name!r} to {got!r}")

    def check_unpublish_never_raises(self) -> None:
        """unpublish of a gone or never-published name is quiet."""
        service = self.service()
        address = ("127.0.0.1", 15429)
        name = self._published_name(address, "unpublish")
        service.publish(name, address, "kit")
        service.unpublish(name)
        service.unpublish(name)
        service.unpublish(self._name("never"))

    def check_bad_address(self) -> None:
        """An address no peer could reach is refused at publish, and nothing is published."""
        service = self.service()
        for address in (("", 15428), ("127.0.0.1", 0), ("127.0.0.1", 65536)):
            name = self._published_name(address, "bad-address")
            try:
                service.publish(name, address, "kit")
            except SegmentError:
                pass
            else:
                raise AssertionError(f"bad address: {self.label} published {address!r}")
            if not self.cls.names_are_addresses:
                self._gone(service, name, f"bad address {address!r}")

    def check_concurrent(self, threads: int = 8, names_per_thread: int = 10) -> None:
        """Threads publishing and resolving names of their own at once, on one client."""
        service = self.service()
        errors: list[BaseException] = []
        barrier = threading.Barrier(threads)

        def worker(t: int) -> None:
            try:
                barrier.wait(timeout=30)
                for i in range(names_per_thread):
                    address = (f"10.0.{t}.{i + 1}", 20000 + 100 * t + i)
                    if self.cls.names_are_addresses:
                        address = ("127.0.0.1", 20000 + 100 * t + i)
                    name = self._published_name(address, f"t{t}-{i}")
                    service.publish(name, address, f"kit-{t}")
                    self._resolves(service, name, address, f"concurrent (thread {t})")
                    service.unpublish(name)
            except BaseException as e:
                errors.append(e)
                barrier.abort()

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in pool), f"concurrent: {self.label} hung"
        if errors:
            first = next(
                (e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0]
            )
            raise AssertionError(f"concurrent: {self.label}: {first!r}") from first

    def check_close(self) -> None:
        """close is idempotent."""
        service = self.cls(self.config)
        service.close()
        service.close()

    def check_unreachable(self) -> None:
        """A service that cannot be reached: PeerClosed from publish and resolve, quiet
        unpublish."""
        if self.unreachable is None:
            return
        service = self.cls(self.unreachable)
        try:
            address = ("127.0.0.1", 15430)
            name = self._published_name(address, "unreachable")
            for what, call in (
                ("publish", lambda: service.publish(name, address, "kit")),
                ("resolve", lambda: service.resolve(name)),
            ):
                try:
                    call()
                except PeerClosed:
                    pass
                else:
                    raise AssertionError(f"unreachable: {self.label}'s {what} did not raise")
            service.unpublish(name)
        finally:
            service.close()

    # -- checks for a service that stores names ---------------------------------------------
    def check_free_names(self) -> None:
        """Names that are not addresses round-trip."""
        service = self.service()
        tag = uuid.uuid4().hex[:8]
        names = [f"prefill-0-{tag}", f"a:b:{tag}", f"node/7/{tag}", f"decode one {tag}", f"ü-{tag}"]
        for i, name in enumerate(names):
            service.publish(name, ("127.0.0.1", 30000 + i), "kit")
        for i, name in enumerate(names):
            self._resolves(service, name, ("127.0.0.1", 30000 + i), "free names")
            service.unpublish(name)

    def check_republish_moves(self) -> None:
        """Publishing a name again replaces its address."""
        service, other = self.service(), self.service()
        name = self._name("republish")
        service.publish(name, ("127.0.0.1", 31000), "first")
        other.publish(name, ("10.0.0.2", 31001), "second")
        self._resolves(service, name, ("10.0.0.2", 31001), "republish")
        service.unpublish(name)

    def check_unpublish_forgets(self) -> None:
        """An unpublished name stops resolving, for every client."""
        service, other = self.service(), self.service()
        name = self._name("forget")
        service.publish(name, ("127.0.0.1", 31002), "kit")
        self._resolves(other, name, ("127.0.0.1", 31002), "unpublish setup")
        service.unpublish(name)
        self._gone(service, name, "unpublish")
        self._gone(other, name, "unpublish, seen from another client")

    def check_prefix_isolation(self) -> None:
        """Another key_prefix neither sees nor removes the name."""
        mine = self.service()
        theirs = self.service(key_prefix=f"{self.config.key_prefix}-other")
        name = self._name("prefix")
        mine.publish(name, ("127.0.0.1", 31003), "kit")
        self._gone(theirs, name, "prefix isolation")
        theirs.unpublish(name)
        self._resolves(mine, name, ("127.0.0.1", 31003), "prefix isolation: unpublish elsewhere")
        theirs.publish(name, ("127.0.0.1", 31004), "kit")
        self._resolves(mine, name, ("127.0.0.1", 31003), "prefix isolation: publish elsewhere")
        mine.unpublish(name)
        theirs.unpublish(name)

    def check_ttl(self) -> None:
        """A ttl makes a name expire, however small; ttl 0 keeps it."""
        forever = self.service(ttl=0.0)
        kept = self._name("ttl-0")
        forever.publish(kept, ("127.0.0.1", 31005), "kit")
        expiring = self.service(ttl=TTL_S)
        name = self._name("ttl")
        expiring.publish(name, ("127.0.0.1", 31006), "kit")
        self._resolves(expiring, name, ("127.0.0.1", 31006), f"ttl {TTL_S:g}s, right after publish")
        tiny = self.service(ttl=0.0004)
        short = self._name("ttl-tiny")
        tiny.publish(short, ("127.0.0.1", 31007), "kit")
        self._expires(tiny, short, "ttl 0.4ms")
        self._expires(expiring, name, f"ttl {TTL_S:g}s")
        self._resolves(forever, kept, ("127.0.0.1", 31005), "ttl 0, after the others expired")
        forever.unpublish(kept)

    def _expires(self, service: MetadataService, name: str, what: str) -> None:
        deadline = time.monotonic() + EXPIRY_WAIT_S
        while True:
            try:
                service.resolve(name)
            except SegmentError:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: {self.label} still resolves {name!r} {EXPIRY_WAIT_S:g}s later"
                )
            time.sleep(0.05)

    # -- checks for a service whose names are addresses -------------------------------------
    def check_names_are_addresses(self) -> None:
        """A "host:port" resolves to itself unpublished; publish refuses any other name."""
        service = self.service()
        for name, want in (("127.0.0.1:15428", ("127.0.0.1", 15428)), ("[::1]:2", ("::1", 2))):
            self._resolves(service, name, want, "names are addresses")
        address = ("127.0.0.1", 15431)
        for name in ("prefill-0", "127.0.0.1:15432", "10.0.0.1:15431", ""):
            try:
                service.publish(name, address, "kit")
            except SegmentError:
                continue
            raise AssertionError(
                f"names are addresses: {self.label} accepted {name!r} for {address!r}, "
                "which will not resolve there"
            )

    # -- all --------------------------------------------------------------------------------
    def checks(self) -> list[Callable[[], None]]:
        """The checks that apply to this service, in the order ``check_all`` runs them."""
        common = [
            self.check_publish_resolve,
            self.check_unknown_name,
            self.check_unpublish_never_raises,
            self.check_bad_address,
            self.check_concurrent,
            self.check_close,
            self.check_unreachable,
        ]
        if self.cls.names_are_addresses:
            return [*common, self.check_names_are_addresses]
        return [
            *common,
            self.check_free_names,
            self.check_republish_moves,
            self.check_unpublish_forgets,
            self.check_prefix_isolation,
            self.check_ttl,
        ]

    def check_all(self) -> None:
        try:
            for check in self.checks():
                check()
        finally:
            self.close()

    def close(self) -> None:
        """Close every client the checks opened."""
        opened, self._open = self._open, []
        for service in opened:
            service.close()


def check_metadata(
    cls: type[MetadataService],
    config: MetadataConfig,
    unreachable: MetadataConfig | None = None,
) -> None:
    """Run every conformance check against the live service ``config`` points at; raise
    AssertionError on the first failure.

    Args:
        cls: the service class under test (``METADATA.load(name, MetadataService)``).
        config: its config; ``key_prefix`` should be unique to this run (the checks clean up
            what they publish, but a failure may leave names behind).
        unreachable: a config of a service of ``cls`` that cannot be reached (None: skip).
    """
    MetadataKit(cls, config, unreachable).check_all()
