#!/usr/bin/env python3
"""qmp.py SOCKET COMMAND-JSON... — send QMP commands to QEMU, print each reply, fail on an error reply."""
import json, socket, sys, time

def main():
    path, commands = sys.argv[1], sys.argv[2:]
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    else:
        sys.exit(f"qmp: cannot connect to {path}")
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    for text in ['{"execute": "qmp_capabilities"}'] + commands:
        f.write(text + "\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                if json.loads(text).get("execute") == "quit":
                    return
                sys.exit("qmp: connection closed")
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                sys.exit(f"qmp: {text}: {reply['error']}")
            print(json.dumps(reply.get("return")))
            break

main()
