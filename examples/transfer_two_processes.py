"""Two processes, one KV block: a target serves memory, an initiator writes then reads it back."""

import multiprocessing as mp

import numpy as np

from kvferry import KvferryConfig, OpCode, TransferEngine, TransferRequest


def target(names: "mp.Queue[str]", stop: "mp.Event") -> None:  # type: ignore[valid-type]
    with TransferEngine(KvferryConfig(listen={"port": 0})) as engine:
        engine.allocate(64 << 20)  # 64 MiB, pages touched, shareable
        names.put(engine.listen())  # "127.0.0.1:<port>"
        stop.wait()


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    names, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=target, args=(names, stop))
    proc.start()
    segment = names.get()

    with TransferEngine(KvferryConfig(transfer={"transport": "tcp"})) as engine:
        local = engine.register(np.zeros(2 << 20, dtype=np.uint8))  # a caller's buffer
        peer = engine.open_segment(segment)
        local.array[: 1 << 20] = np.random.default_rng(0).integers(0, 256, 1 << 20, np.uint8)

        batch = engine.allocate_batch(16)
        engine.submit(batch, [TransferRequest(OpCode.WRITE, local, 0, peer, 4096, 1 << 20)])
        print("write:", engine.wait(batch, timeout=5).state)
        engine.free_batch(batch)

        engine.transfer_sync(
            [TransferRequest(OpCode.READ, local, 1 << 20, peer, 4096, 1 << 20)], timeout=5
        )
        same = bool((local.array[: 1 << 20] == local.array[1 << 20 :]).all())
        print("read back equal:", same, "via", peer.transport)
        tcp = engine.metrics()["tcp"]
        print("tcp bytes written/read:", tcp["bytes_written"], tcp["bytes_read"])
    stop.set()
    proc.join()
