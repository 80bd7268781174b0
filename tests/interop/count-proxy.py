#!/usr/bin/env python3
"""count-proxy.py LISTEN_PORT TARGET_PORT LOG [cut:BYTES] — forward TCP connections on 127.0.0.1
from LISTEN_PORT to TARGET_PORT unchanged and, when each ends, append a line to LOG:
"<n> client_to_server=<bytes> server_to_client=<bytes>". The tests use it to show how much a
refused peer received before it was refused. With cut:BYTES, each connection is closed both ways
once the server has sent more than BYTES (a link that breaks mid-transfer)."""
import socket, sys, threading

listen_port, target_port, log_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cut = int(sys.argv[4][4:]) if len(sys.argv) > 4 and sys.argv[4].startswith("cut:") else None
lock = threading.Lock()


def pump(src, dst, counts, key):
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            counts[key] += len(data)
            dst.sendall(data)
            if cut is not None and key == "s2c" and counts[key] > cut:
                for s in (src, dst):
                    s.shutdown(socket.SHUT_RDWR)
                break
    except OSError:
        pass
    for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
        try:
            s.shutdown(how)
        except OSError:
            pass


def serve(number, client):
    counts = {"c2s": 0, "s2c": 0}
    try:
        upstream = socket.create_connection(("127.0.0.1", target_port))
    except OSError:
        client.close()
        return
    threads = [threading.Thread(target=pump, args=(client, upstream, counts, "c2s")),
               threading.Thread(target=pump, args=(upstream, client, counts, "s2c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    upstream.close()
    with lock, open(log_path, "a") as f:
        f.write(f"{number} client_to_server={counts['c2s']} server_to_client={counts['s2c']}\n")


srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen_port))
srv.listen(8)
number = 0
while True:
    client, _ = srv.accept()
    number += 1
    threading.Thread(target=serve, args=(number, client), daemon=True).start()
