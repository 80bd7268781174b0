#!/usr/bin/env python3
"""cut-proxy.py LISTEN TARGET CUT_AFTER — forward one unix-socket connection to TARGET and cut both
directions (RST-like close) once CUT_AFTER bytes have gone from TARGET to the client."""
import os, socket, sys, threading

listen_path, target_path, cut_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(socket.AF_UNIX)
srv.bind(listen_path)
srv.listen(1)
client, _ = srv.accept()
upstream = socket.socket(socket.AF_UNIX)
upstream.connect(target_path)
done = threading.Event()

def pump(src, dst, limit):
    sent = 0
    try:
        while not done.is_set():
            data = src.recv(65536)
            if not data:
                break
            if limit is not None and sent + len(data) >= limit:
                dst.sendall(data[: limit - sent])
                break
            dst.sendall(data)
            sent += len(data)
    except OSError:
        pass
    done.set()
    for s in (client, upstream):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

threads = [threading.Thread(target=pump, args=(upstream, client, cut_after)),
           threading.Thread(target=pump, args=(client, upstream, None))]
for t in threads:
    t.start()
for t in threads:
    t.join()
