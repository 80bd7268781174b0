#!/usr/bin/env python3
"""journal.py — writers for the migration tests, and the check that no acknowledged write was lost.

  journal.py mirror SEED STOP SECONDS PAUSE_MS FILE:EXPECT...
      Random writes (1 B to 70 kB) to randomly chosen FILEs, each mirrored into its EXPECT file
      once write() returned, until STOP exists, SECONDS pass (0: no limit) or a write fails
      (the source refusing writes after the hand-over). PAUSE_MS between writes.

  journal.py write FILE JOURNAL STOP SEED
      Random writes (100 B to 70 kB) to FILE until STOP exists or a write fails. Each write is
      logged ("W offset length seed") before it is issued and acknowledged ("A") only after
      write() and fsync() both returned: only then may a device call it durable.
  journal.py check FILE BASE JOURNAL [--missing-ok BLOCK_SIZE]
      FILE must equal BASE with every acknowledged write applied; the one write in flight when
      the journal ends (logged, never acknowledged) may have landed or not, byte by byte. With
      --missing-ok, a block whose read fails with EIO (never arrived after a broken post-copy) is
      counted instead of failing; every block that reads must be right, and at least one must
      be missing."""
import errno, os, random, sys


def data_for(seed, length):
    return random.Random(seed).randbytes(length)


def open_new_mount(path):
    """Open a device file of a mount that has just appeared: once in a CI run the file was listed
    and its open still failed with ENOENT, so that is retried for up to 2 s (any other error, or
    a file that stays missing, fails as before)."""
    import time
    deadline = time.monotonic() + 2
    while True:
        try:
            return os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def write(path, journal, stop, seed):
    r = random.Random(int(seed))
    fd = open_new_mount(path)
    size = os.fstat(fd).st_size
    n = 0
    with open(journal, "w", buffering=1) as j:
        while not os.path.exists(stop):
            off = r.randrange(0, size - 1)
            length = min(r.choice([100, 4096, 70000]), size - off)
            s = r.randrange(1 << 30)
            j.write(f"W {off} {length} {s}\n")
            try:
                if os.pwrite(fd, data_for(s, length), off) != length:
                    raise OSError(errno.EIO, "short write")
                os.fsync(fd)
            except OSError as e:
                print(f"writer: stopped by {e.strerror} after {n} acknowledged writes")
                return
            j.write("A\n")
            n += 1
    print(f"writer: {n} acknowledged writes, stopped on request")


def mirror(seed, stop, seconds, pause_ms, pairs):
    import time
    r = random.Random(int(seed))
    fds = [(open_new_mount(f), os.open(e, os.O_WRONLY)) for f, e in (p.split(":") for p in pairs)]
    print("writer: started", flush=True)
    end = time.monotonic() + float(seconds) if float(seconds) > 0 else None
    n = 0
    while not os.path.exists(stop) and (end is None or time.monotonic() < end):
        fd, ex = r.choice(fds)
        size = os.fstat(ex).st_size
        off = r.randrange(0, size - 1)
        data = r.randbytes(min(r.choice([1, 100, 4096, 70000]), size - off))
        try:
            w = os.pwrite(fd, data, off)
        except OSError as e:
            print(f"writer: stopped by {e.strerror} after {n} writes")
            return
        os.pwrite(ex, data[:w], off)
        n += 1
        if float(pause_ms) > 0:
            time.sleep(float(pause_ms) / 1000)
    print(f"writer: {n} writes")


def check(path, base, journal, missing_ok):
    want = bytearray(open(base, "rb").read())
    pending = None
    for line in open(journal):
        parts = line.split()
        if parts[0] == "W":
            pending = tuple(int(x) for x in parts[1:])
        elif parts[0] == "A" and pending:
            off, length, s = pending
            want[off:off + length] = data_for(s, length)
            pending = None
    alt = bytearray(want)  # with the write in flight applied
    if pending:
        off, length, s = pending
        alt[off:off + length] = data_for(s, length)
    size = len(want)
    block = missing_ok or size
    fd = os.open(path, os.O_RDONLY)
    missing = 0
    for off in range(0, size, block):
        try:
            got = os.pread(fd, block, off)
        except OSError as e:
            if missing_ok and e.errno == errno.EIO:
                missing += 1
                continue
            sys.exit(f"check: {path} at {off}: {e.strerror}")
        end = off + len(got)
        if len(got) != min(block, size - off):
            sys.exit(f"check: {path}: short read at {off}")
        if got == want[off:end] or got == alt[off:end]:
            continue
        for i in range(off, end):
            if got[i - off] != want[i] and got[i - off] != alt[i]:
                sys.exit(f"check: {path}: byte {i} is {got[i - off]:#x}, an acknowledged write says {want[i]:#x}")
    if missing_ok and missing == 0:
        sys.exit(f"check: {path}: no block was missing, so nothing was tested")
    acked = sum(1 for line in open(journal) if line.startswith("A"))
    extra = f", {missing} blocks never arrived (read fails with EIO)" if missing_ok else ""
    print(f"check: {path} holds all {acked} acknowledged writes{extra}")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(*sys.argv[2:6])
    elif sys.argv[1] == "mirror":
        mirror(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    else:
        mo = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[5] == "--missing-ok" else 0
        check(sys.argv[2], sys.argv[3], sys.argv[4], mo)
