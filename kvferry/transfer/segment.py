"""What an initiator knows about a target segment: its regions and how to reach them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvferry.errors import ProtocolError, SegmentError
from kvferry.transfer.memory import ShmInfo

if TYPE_CHECKING:
    from kvferry.transfer.transports.base import Channel


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """A region a target grants: id, size, location, (for allocated ones) its shm mapping, and
    whether peers may write into it (a store server's pool is read-only to the wire)."""

    region_id: int
    size: int
    location: str = "cpu"
    shm: ShmInfo | None = None
    writable: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.region_id,
            "size": self.size,
            "location": self.location,
            "shm": self.shm.to_json() if self.shm else None,
            "writable": self.writable,
        }

    @classmethod
    def from_json(cls, doc: object) -> RegionInfo:
        """Parse a region description from a handshake, validating every field.

        Raises:
            ProtocolError: a field is missing or of the wrong type.
        """
        if not isinstance(doc, dict):
            raise ProtocolError("region description must be an object")
        try:
            rid, size, location = doc["id"], doc["size"], doc.get("location", "cpu")
            shm_doc = doc.get("shm")
            writable = doc.get("writable", True)
            if not (isinstance(rid, int) and isinstance(size, int) and isinstance(location, str)):
                raise TypeError("id/size must be ints and location a string")
            if not isinstance(writable, bool):
                raise TypeError("writable must be a boolean")
            if rid < 0 or size <= 0:
                raise ValueError(f"id {rid} or size {size} out of range")
            shm = None
            if shm_doc is not None:
                fields = [shm_doc[k] for k in ("pid", "fd", "inode", "device")]
                if not all(isinstance(v, int) for v in fields):
                    raise TypeError("shm fields must be ints")
                shm = ShmInfo(*fields)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad region description {doc!r}: {e}") from e
        return cls(rid, size, location, shm, writable)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A target as its handshake describes it."""

    name: str
    address: tuple[str, int]
    instance: str
    boot_id: str
    pid: int
    regions: tuple[RegionInfo, ...]
    ops: frozenset[str] = frozenset()  # optional wire ops the target serves ("readv")
    max_frame: int | None = None  # largest frame payload the target takes (None: not said)
    service: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """What a service mounted on the target's listener says of itself (the store server:
    ``{"store_protocol": N}``); empty for a plain transfer target."""

    def region(self, region_id: int | None) -> RegionInfo:
        """The region with this id (None: the first one).

        Raises:
            SegmentError: the target grants no such region.
        """
        if region_id is None:
            if not self.regions:
                raise SegmentError(f"segment {self.name} has no registered memory")
            return self.regions[0]
        for region in self.regions:
            if region.region_id == region_id:
                return region
        raise SegmentError(
            f"segment {self.name} has no region {region_id}; it has "
            f"{[r.region_id for r in self.regions]}"
        )


@dataclass(eq=False)
class SegmentHandle:
    """An opened target segment; pass it as ``TransferRequest.target``.

    Attributes:
        name: the segment name it was opened by ("host:port" with p2p metadata).
        peer: the target's description from the handshake.
        transport: the transport chosen for it ("local", "shm" or "tcp").
    """

    name: str
    peer: PeerInfo
    transport: str
    channel: Channel = field(repr=False)

    @property
    def regions(self) -> tuple[RegionInfo, ...]:
        return self.peer.regions

    @property
    def size(self) -> int:
        """Bytes of the first region (the usual single-region target)."""
        return self.peer.region(None).size
