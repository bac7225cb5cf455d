#!/usr/bin/env python
"""keiryo serve under hostile clients (issue 14, numbers), measured on a real server process in one run.

1. Unauthenticated junk: 10,000 requests to random model names (all 401), 32 at a time; /metrics size and the
   server's RSS before and after (they must not grow: labels come only from configured names).
2. 1,000 slow and idle connections (a third connect and send nothing, a third send half a header, a third send
   authenticated headers and a trickle of body): while they are open, wrk (1 thread, 8 connections, binary
   OIP requests) measures authenticated throughput against the same load without them; then how long the
   server takes to close every one of them (its header and body-read deadlines, 10 s each by default).
   ``--limit-concurrency`` is set to the hostile connections + 100, or the server would answer 503 to
   everyone once the idle ones hold its 1,000 default slots.

    .venv/bin/python bench/serve_hostile.py --reuse keiryo-demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from _checks import cpu_line, report
from _serving import publish_demo

from keiryo.testing.live import free_port

KEY = "bench-key-0123456789abcdef"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def junk(url: str, n: int, conc: int) -> dict[int, int]:
    codes: dict[int, int] = {}
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conc)) as c:

        async def one() -> None:
            async with sem:
                r = await c.post(f"{url}/v2/models/{uuid.uuid4().hex}/infer", content=b'{"inputs": []}')
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        await asyncio.gather(*(one() for _ in range(n)))
    return codes


def wrk_rps(url: str, body: bytes, header_len: int, seconds: float, work: Path) -> tuple[float, int]:
    lua = work / "bin.lua"
    escaped = "".join("\\" + format(b, "03d") for b in body)  # a Lua string literal of the raw bytes
    lua.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{escaped}"\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{header_len}"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
    )
    text = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds:g}s", "-s", str(lua), url], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return rps, int(non2xx.group(1)) if non2xx else 0


def open_hostile(port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 3 == 1:
            s.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\n")  # half a header
        elif i % 3 == 2:
            s.sendall(
                f"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{".encode()
            )  # a body that trickles
        socks.append(s)
    return socks


def closed_after(socks: list[socket.socket], limit_s: float) -> tuple[int, float]:
    """(how many the server closed within limit_s, seconds until the last one closed)."""
    import selectors

    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    t0 = time.monotonic()
    closed, last = 0, 0.0
    while closed < len(socks) and time.monotonic() - t0 < limit_s:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(65536)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data or b"HTTP/1.1 408" in data or b"HTTP/1.1 4" in data:
                sel.unregister(s)
                closed += 1
                last = time.monotonic() - t0
    for s in socks:
        s.close()
    return closed, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", type=Path, required=True, help="a `keiryo demo` output directory")
    ap.add_argument("--junk", type=int, default=10_000)
    ap.add_argument("--hostile", type=int, default=1_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # 1,000 sockets here, as many there

    demo = publish_demo(args.reuse, "int8", "hostile")
    work, pub, inp, shape = demo.work, demo.pub, demo.input, demo.shape
    raw = demo.x.astype("<f4").tobytes()
    head = json.dumps(
        {"inputs": [{"name": inp["name"], "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}]}
    )
    body = head.encode() + raw

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).with_name("keiryo")),
        "serve",
        "--registry",
        str(demo.registry),
        "--model",
        "demo@production",
    ]
    cmd += ["--public-key", str(pub), "--port", str(port), "--poll-s", "0", "--limit-concurrency", str(args.hostile + 100)]
    env = {**os.environ, "KEIRYO_API_KEYS": KEY}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        end = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > end:
                    raise
            time.sleep(0.1)
        wrk_rps(url + "/v2/models/demo/infer", body, len(head), 2, work)  # warm-up
        asyncio.run(junk(url, 300, 32))
        size0, rss0 = len(httpx.get(url + "/metrics", headers=auth).content), rss_mb(proc.pid)
        t = time.perf_counter()
        codes = asyncio.run(junk(url, args.junk, 32))
        junk_s = time.perf_counter() - t
        size1, rss1 = len(httpx.get(url + "/metrics", headers=auth).content), rss_mb(proc.pid)

        normal, err0 = wrk_rps(url + "/v2/models/demo/infer", body, len(head), args.seconds, work)
        socks = open_hostile(port, args.hostile)
        t_open = time.monotonic()
        loaded, err1 = wrk_rps(url + "/v2/models/demo/infer", body, len(head), args.seconds, work)
        waited = time.monotonic() - t_open
        closed, last = closed_after(socks, 40.0)
    finally:
        proc.terminate()
        proc.wait(30)

    growth_m = (size1 - size0) / size0
    growth_r = (rss1 - rss0) / rss0
    print(f"\nCPU: {cpu_line(1)}")
    print(f"junk: {args.junk} unauthenticated requests to random model names in {junk_s:.1f} s: {codes}")
    print(f"  /metrics {size0} -> {size1} bytes ({growth_m:+.2%}); server RSS {rss0:.1f} -> {rss1:.1f} MB ({growth_r:+.2%})")
    print(f"hostile: {args.hostile} idle / half-header / trickling-body connections open")
    print(
        f"  authenticated throughput (wrk, 8 connections, binary): {normal:.0f} req/s without, {loaded:.0f} with them "
        f"({loaded / normal:.1%}); non-2xx {err0} / {err1}"
    )
    print(
        f"  closed by the server: {closed}/{args.hostile}, the last {last + waited:.1f} s after they were opened "
        "(the server's header and body-read deadlines: 10 s)"
    )
    checks = [
        ("/metrics size unchanged after 10,000 junk requests (±1%)", abs(growth_m) <= 0.01, f"{growth_m:+.2%}"),
        ("server RSS unchanged (±1%)", abs(growth_r) <= 0.01, f"{growth_r:+.2%}"),
        ("throughput with 1,000 hostile connections >= 90% of normal", loaded >= 0.9 * normal, f"{loaded / normal:.1%}"),
        ("every hostile connection closed by the server", closed == args.hostile, f"{closed}/{args.hostile}"),
    ]
    return report(checks, work)


if __name__ == "__main__":
    raise SystemExit(main())
