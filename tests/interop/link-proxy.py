#!/usr/bin/env python3
"""link-proxy.py LISTEN TARGET MODE [MARKER] — forward one unix-socket connection from a
destination (the client) to a source (TARGET), reading the source's frames (docs/protocol.md),
and break the link:

  cut:BYTES  after BYTES bytes from the source, close both directions at once.
  PHASE      at PHASE the link stalls: nothing more goes from the source to the destination (the destination's
frames still go through, so it can acknowledge what it has), and MARKER is created. PHASE is
"bulk:N" (after N block frames), "suspended" (after the SUSPENDED event) or "authority" (after the
AUTHORITY event). From then on, as soon as either side goes away the proxy closes both ends, so
the survivor sees its connection drop as it would when its peer's host dies."""
import os, select, socket, struct, sys, threading

listen_path, target_path, phase = sys.argv[1:4]
marker = sys.argv[4] if len(sys.argv) > 4 else None
cut_after = int(phase[4:]) if phase.startswith("cut:") else None
HEADER = 8
BLOCK_TYPES = {4, 5, 6}           # BLOCK, BLOCK_ZERO, BLOCK_ZSTD
EVENT = 10
EVENTS = {"suspended": 2, "authority": 3}

srv = socket.socket(socket.AF_UNIX)
srv.bind(listen_path)
srv.listen(1)
client, _ = srv.accept()
upstream = socket.socket(socket.AF_UNIX)
upstream.connect(target_path)
done = threading.Event()


def close_both():
    done.set()
    for s in (client, upstream):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def reached(ftype, payload, blocks):
    if phase.startswith("bulk:"):
        return ftype in BLOCK_TYPES and blocks >= int(phase[5:])
    return ftype == EVENT and len(payload) == 2 and struct.unpack("<H", payload)[0] == EVENTS[phase]


def from_source():
    buf, blocks, sent = b"", 0, 0
    try:
        while not done.is_set():
            data = upstream.recv(65536)
            if not data:
                break
            if cut_after is not None:
                if sent + len(data) >= cut_after:
                    client.sendall(data[:cut_after - sent])
                    break
                client.sendall(data)
                sent += len(data)
                continue
            buf += data
            while len(buf) >= HEADER:
                length, ftype = struct.unpack_from("<IB", buf)
                if len(buf) < HEADER + length:
                    break
                frame, buf = buf[:HEADER + length], buf[HEADER + length:]
                client.sendall(frame)
                blocks += ftype in BLOCK_TYPES
                if reached(ftype, frame[HEADER:], blocks):
                    open(marker, "w").close()
                    # Stalled: wait for either side to go away, reading nothing more from the source.
                    p = select.poll()
                    for s in (client, upstream):
                        p.register(s, select.POLLHUP | select.POLLRDHUP)
                    while not done.is_set():
                        if p.poll(100):
                            break
                    close_both()
                    return
    except OSError:
        pass
    close_both()


def from_destination():
    try:
        while not done.is_set():
            data = client.recv(65536)
            if not data:
                break
            upstream.sendall(data)
    except OSError:
        pass
    close_both()


threads = [threading.Thread(target=from_source), threading.Thread(target=from_destination)]
for t in threads:
    t.start()
for t in threads:
    t.join()
