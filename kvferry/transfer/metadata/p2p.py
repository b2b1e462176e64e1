"""p2p metadata (the default): a segment's name is its target's "host:port"; nothing to publish."""

from __future__ import annotations

from kvferry.errors import SegmentError
from kvferry.transfer.metadata.base import MetadataService, parse_address


class P2pMetadata(MetadataService):
    name = "p2p"

    def publish(self, name: str, address: tuple[str, int], instance: str) -> None:
        pass

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
