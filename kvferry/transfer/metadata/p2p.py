"""p2p metadata (the default): a segment's name is its target's "host:port"; nothing to publish."""

from __future__ import annotations

from kvferry.errors import SegmentError
from kvferry.transfer.metadata.base import MetadataService, check_address, parse_address


class P2pMetadata(MetadataService):
    name = "p2p"
    names_are_addresses = True

    def publish(self, name: str, address: tuple[str, int], instance: str) -> None:
        """Store nothing, but refuse a name that would not resolve to ``address``: a target
        that announced "prefill-0" with p2p metadata would be unreachable by that name."""
        check_address(address)
        try:
            host, port = parse_address(name)
        except ValueError as e:
            reason = str(e)
        else:
            if (host, port) == (address[0], address[1]):
                return
            reason = f"it resolves to {host}:{port}"
        raise SegmentError(
            f"cannot publish segment {name!r} at {address[0]}:{address[1]}: with p2p "
            f"metadata a segment name is the target's host:port ({reason}); leave the name "
            "out, or set metadata.backend to redis to publish free names"
        )

    def resolve(self, name: str) -> tuple[str, int]:
        try:
            return parse_address(name)
        except ValueError as e:
            raise SegmentError(
                f"cannot open segment {name!r}: with p2p metadata a segment name is the "
                f"target's host:port, e.g. 127.0.0.1:15428 ({e})"
            ) from e

    def unpublish(self, name: str) -> None:
        pass
