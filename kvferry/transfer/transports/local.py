"""The local transport: the target is this very engine, so a transfer is one memmove (or, for a
target region in GPU memory, one device copy to or from the initiator's host buffer)."""

from __future__ import annotations

from collections.abc import Sequence

from kvferry.errors import SegmentError, TransferError
from kvferry.transfer.batch import OpCode
from kvferry.transfer.memory import DeviceRegion, memmove
from kvferry.transfer.segment import PeerInfo
from kvferry.transfer.transports.base import Channel, Transport, WorkItem


class LocalChannel(Channel):
    transport = "local"

    def __init__(self, transport: LocalTransport) -> None:
        super().__init__(transport.counters)
        self._regions = transport.ctx.local_regions

    def post(self, items: Sequence[WorkItem]) -> None:
        for item in items:
            region = self._regions.get(item.region_id)
            if region is None:
                item.request.fail(SegmentError(f"local region {item.region_id} was unregistered"))
                continue
            if isinstance(region, DeviceRegion):
                self._device_copy(region, item)
                continue
            target = region.address + item.target_offset
            source = item.local.address + item.local_offset
            if item.op is OpCode.READ:
                memmove(source, target, item.length)
            else:
                memmove(target, source, item.length)
            if item.request.slice_done(item.length):
                self._completed(item)

    def _device_copy(self, region: DeviceRegion, item: WorkItem) -> None:
        host = item.local.array[item.local_offset : item.local_offset + item.length]
        try:
            if item.op is OpCode.READ:
                region.to_host(item.target_offset, host)
            else:
                region.from_host(item.target_offset, host)
        except Exception as e:  # CUDA errors come as RuntimeError (or torch's own)
            item.request.fail(TransferError(f"device copy with {region!r}: {e}"))
            return
        if item.request.slice_done(item.length):
            self._completed(item)

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    name = "local"

    def reachable(self, peer: PeerInfo) -> bool:
        return peer.instance == self.ctx.instance

    def open(self, peer: PeerInfo) -> Channel:
        return LocalChannel(self)
