#!/usr/bin/python3
"""A stdlib-only HTTP client run inside the test container (the service's port is on the
container's own loopback). Prints one JSON object: {"status", "headers", "body" | "events"}.

    client.py get PATH
    client.py post PATH JSON [HEADER:VALUE ...]
    client.py stream PATH JSON   # SSE; prints "first event" on its own line when one arrives
"""

import http.client
import json
import sys

HOST, PORT = "127.0.0.1", 8000


def main(argv: list[str]) -> int:
    kind, path = argv[0], argv[1]
    conn = http.client.HTTPConnection(HOST, PORT, timeout=120)
    headers = {"Content-Type": "application/json"}
    for extra in argv[3:]:
        name, value = extra.split(":", 1)
        headers[name] = value
    if kind == "get":
        conn.request("GET", path)
    else:
        conn.request("POST", path, body=argv[2].encode(), headers=headers)
    resp = conn.getresponse()
    out = {"status": resp.status, "headers": {k.lower(): v for k, v in resp.getheaders()}}
    if kind == "stream" and resp.status == 200:
        events = []
        buffer = b""
        while True:
            line = resp.readline()
            if not line:
                break
            buffer += line
            if line == b"\n":
                event = buffer.decode().strip()
                buffer = b""
                if event.startswith("data: "):
                    events.append(event[len("data: "):])
                    if len(events) == 1:
                        print("first event", flush=True)
        out["events"] = events
    else:
        raw = resp.read().decode()
        try:
            out["body"] = json.loads(raw)
        except ValueError:
            out["body"] = raw
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
