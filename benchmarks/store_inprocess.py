"""In-process store: batch-get of 4 KiB blocks (128 per call) and the lookup of a 64-block prefix.

    .venv/bin/python benchmarks/store_inprocess.py
"""

import time
from kvferry.store import TieredStore
from kvferry.config.models import KvferryConfig, StoreConfig, CpuTierConfig
cfg=KvferryConfig(store=StoreConfig(tiers=['cpu'],slot_size=4096),cpu=CpuTierConfig(buffer_number=8192))
s=TieredStore(cfg)
keys=[i.to_bytes(16,'little') for i in range(4096)]
for i in range(0,4096,128): s.put(keys[i:i+128],[b'x'*4096]*128)
import numpy as np
outbuf=np.zeros((128,4096),np.uint8); outs=[memoryview(outbuf[i]) for i in range(128)]
b=[keys[i*128:(i+1)*128] for i in range(32)]
t0=time.perf_counter(); n=0
while time.perf_counter()-t0<1:
    for kk in b: s.get(kk,outs); n+=128
print('get',n/(time.perf_counter()-t0),'blocks/s')
t0=time.perf_counter(); n=0
while time.perf_counter()-t0<1:
    for kk in b: s.lookup(kk[:64]); n+=1
print('lookup64',1e6*(time.perf_counter()-t0)/n,'us')
