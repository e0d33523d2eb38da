"""A hostile stand-in for the sandbox's supervisor: run inside a sandbox container (``python -c``).

It speaks enough of the protocol to be attached to (the ready event, pings) and answers ``run``
the way argv[1] says: a forged result, a reply that never ends, or none at all. It stands in for
any way the attach stream can be written from inside (a cell that took over its executor), so the
host's checks are tested without depending on the sandbox's own hardening. Stdlib only.
"""

import base64
import json
import os
import sys
import time

MODE = sys.argv[1]
MIB = 1 << 20


def write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def send(obj: dict) -> None:
    write((json.dumps(obj) + "\n").encode())


def result(**fields: object) -> dict:
    base = {"stdout": "", "stderr": "", "results": [], "error": None, "files": [], "notes": [],
            "duration_s": 0.01, "timed_out": False, "oom_killed": False, "truncated": False, "restarted": False}
    base.update(fields)
    return base


def file(name: str, data: bytes, size: int | None = None) -> dict:
    return {"name": name, "size": len(data) if size is None else size, "data": base64.b64encode(data).decode()}


def image(mime: str, data: bytes) -> dict:
    return {"kind": "display_data", "data": {"text/plain": "<Figure>", mime: base64.b64encode(data).decode()}}


FORGED = {
    "traversal": lambda: result(files=[file("../../etc/passwd", b"root::0:0:root:/root:/bin/sh\n")]),
    "absolute": lambda: result(files=[file("/etc/cron.d/evil", b"* * * * * root sh -c id\n")]),
    "newline_nul": lambda: result(files=[file("a\nb\0c", b"x")]),
    "oversize": lambda: result(files=[file("big.bin", b"\0" * (40 * MIB))]),
    "lying_size": lambda: result(files=[file("small.txt", b"hello", size=3)]),
    "too_many_files": lambda: result(files=[file(f"f{i}.txt", b"x") for i in range(200)]),
    "over_total": lambda: result(files=[file(f"f{i}.bin", b"\0" * (9 * MIB)) for i in range(4)]),
    "not_base64": lambda: result(files=[{"name": "x.txt", "size": 3, "data": "!!!!"}]),
    "not_png": lambda: result(results=[image("image/png", b"GIF89a this is not a PNG at all")]),
    "not_jpeg": lambda: result(results=[image("image/jpeg", b"\x89PNG\r\n\x1a\n not a JPEG")]),
    "wrong_type": lambda: result(stdout=["a", "list"]),
    "unknown_mime": lambda: result(results=[{"kind": "display_data", "data": {"application/x-evil": "x"}}]),
    # the largest reply an honest executor sends under the default config (the output files count
    # within the 32 MiB total): accepted
    "max_honest": lambda: result(
        stdout="o" * 20_000, truncated=True,
        files=[{**file("stdout.txt", b"o" * (10 * MIB)), "mime": "text/plain"},
               {**file("stderr.txt", b"e" * (10 * MIB)), "mime": "text/plain"},
               *(file(f"out/f{i:02}.bin", os.urandom(12 * MIB // 20)) for i in range(20))]),
    # honest-looking names the host does not pass on: dropped with a note, the session is kept
    "control_name": lambda: result(files=[file("a\tb.txt", b"x"), file("ok.txt", b"kept")]),
    "surrogate_text": lambda: result(stdout="bad \udcc3 text", files=[file("\udcc3.txt", b"x")]),
}


def run_reply(req: dict) -> None:
    rid = req["id"]
    if MODE in FORGED:
        send({"id": rid, "ok": True, "result": FORGED[MODE]()})
    elif MODE == "giant_reply":  # a reply line of 1 GiB: valid JSON, if anyone read that far
        write(b'{"id": "' + rid.encode() + b'", "ok": true, "result": {"stdout": "')
        chunk = b"x" * MIB
        for _ in range(1024):
            write(chunk)
        write(b'"}}\n')
    elif MODE == "giant_no_newline":  # 1 GiB that never ends its line
        chunk = b"y" * MIB
        for _ in range(1024):
            write(chunk)
    elif MODE == "fake_headers":  # bytes shaped like frame headers declaring 4 GiB, in small writes
        pattern = b"\x01\x00\x00\x00\xff\xff\xff\xf0" * 64
        for _ in range(2 * 1024 * 1024):
            write(pattern)
    elif MODE == "amplify":  # a short-enough line that parses into millions of objects
        write(b'{"id": "' + rid.encode() + b'", "ok": true, "result": {"stdout": "", "x": [')
        chunk = b"[]," * (MIB // 3)
        for _ in range(60):
            write(chunk)
        write(b'[]]}}\n')
    elif MODE == "silent":  # answers pings, never a run
        return
    else:
        raise SystemExit(f"unknown mode {MODE}")


def main() -> None:
    send({"event": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("op") == "ping":
            send({"id": req["id"], "ok": True, "busy": False, "idle_ttl_s": 1.0})
        elif req.get("op") == "run":
            run_reply(req)
        else:
            send({"id": req["id"], "ok": True})
    time.sleep(3600)  # stdin closed: stay, as a wedged executor would


main()
