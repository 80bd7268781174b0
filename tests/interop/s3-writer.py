#!/usr/bin/env python3
"""Write 4 KiB blocks at random offsets below LIMIT into a served device file until STOP exists
or a write fails; apply each acknowledged write to EXPECTED (an image of the device), so the
test knows what the device must hold. Prints the number of acknowledged writes."""
import os
import random
import sys
import time

path, expected, stop, limit, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
data = bytearray(open(expected, "rb").read())
fd = os.open(path, os.O_RDWR)
rnd = random.Random(seed)
n = 0
while not os.path.exists(stop):
    off = rnd.randrange(0, limit, 4096)
    buf = rnd.randbytes(4096)
    try:
        os.pwrite(fd, buf, off)
    except OSError:
        break
    data[off:off + 4096] = buf
    n += 1
    time.sleep(0.002)
tmp = expected + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.rename(tmp, expected)
print(n)
