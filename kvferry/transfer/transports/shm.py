"""The shm transport: a same-host target's allocated regions are mapped into this process.

After the handshake the initiator opens the target's memfd through /proc/<pid>/fd/<fd> (checked
by inode), maps it, and every transfer is a memmove at memory speed, with no round trip and no
target CPU. Only regions the target allocated (not caller-registered buffers) can be mapped.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvferry.errors import SegmentError
from kvferry.transfer.batch import OpCode
from kvferry.transfer.host import same_host
from kvferry.transfer.memory import PeerMapping, memmove
from kvferry.transfer.segment import PeerInfo
from kvferry.transfer.transports.base import Channel, Transport, WorkItem


class ShmChannel(Channel):
    transport = "shm"

    def __init__(self, transport: ShmTransport, peer: PeerInfo) -> None:
        super().__init__(transport.counters)
        self._maps: dict[int, PeerMapping] = {}
        try:
            for region in peer.regions:
                if region.shm is None:
                    raise SegmentError(
                        f"region {region.region_id} of {peer.name} is a registered buffer, "
                        "not shared memory; use the tcp transport for it"
                    )
                self._maps[region.region_id] = PeerMapping(region.shm, region.size)
        except SegmentError:
            self.close()
            raise

    def post(self, items: Sequence[WorkItem]) -> None:
        maps = self._maps
        for item in items:
            mapping = maps.get(item.region_id)
            if mapping is None:
                item.request.fail(SegmentError(f"region {item.region_id} is not mapped"))
                continue
            target = mapping.address + item.target_offset
            source = item.local.address + item.local_offset
            if item.op is OpCode.READ:
                memmove(source, target, item.length)
            else:
                memmove(target, source, item.length)
            if item.request.slice_done(item.length):
                self._completed(item)

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mapping in maps.values():
            mapping.close()


class ShmTransport(Transport):
    name = "shm"

    def reachable(self, peer: PeerInfo) -> bool:
        if not same_host(self.ctx.boot_id, peer.boot_id) or not peer.regions:
            return False
        if any(r.shm is None for r in peer.regions):
            return False
        try:
            ShmChannel(self, peer).close()
        except SegmentError:
            return False
        return True

    def open(self, peer: PeerInfo) -> Channel:
        return ShmChannel(self, peer)
