#!/usr/bin/env python
"""Inference-server load figures (issue: ship), measured side by side in one run.

Packages the demo's int8 ONNX candidate (its best; --candidate fp32 for the other), publishes it in a temporary registry and starts
`keiryo serve` in its own process twice: with dynamic batching (max batch 32) and without (max
batch 1). A closed-loop asyncio client on loopback keeps C requests in flight (C = 1, 8, 32) for
a bounded time, with the binary tensor extension, and records p50/p95/p99 and throughput. At
C=32 the two servers take turns for --rounds rounds and the throughput ratio is the median
round's. The server's added latency is the p50 at C=1 minus a bare onnxruntime call on the same input.
`--soak S` then runs C=32 with batching for S seconds and reports non-503 5xx and RSS growth.

    .venv/bin/python bench/serve.py --reuse keiryo-demo                 # ~2 min
    .venv/bin/python bench/serve.py --reuse keiryo-demo --soak 300      # + the 5-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _checks import report
from _serving import bare_p50_ms, publish_demo

from keiryo.machine import cpu

KEY = "bench-key-0123456789abcdef"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(registry: Path, pub: Path, max_batch: int, threads: int = 1) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [str(Path(sys.executable).with_name("keiryo")), "serve", "--registry", str(registry), "--model", "demo@production"]
    cmd += ["--public-key", str(pub), "--port", str(port), "--max-batch-size", str(max_batch), "--max-queue", "1024"]
    cmd += ["--poll-s", "0", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, env={**os.environ, "KEIRYO_API_KEYS": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 120
    while time.time() < end:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def binary_request(x: np.ndarray, input_name: str, output_name: str) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(
        {
            "inputs": [
                {"name": input_name, "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        }
    ).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Inference-Header-Content-Length": str(len(head))}
    return head + x.tobytes(), headers


async def closed_loop(url: str, body: bytes, headers: dict[str, str], conc: int, seconds: float) -> dict[str, float]:
    """C keep-alive connections, each sending its next request as soon as the previous answer is read.

    A minimal HTTP/1.1 client on asyncio streams: a general-purpose Python client (httpx) costs
    more CPU per request than the server does, and it shares the server's cores here.
    """
    host, port = url.split("//")[1].split(":")
    head = f"POST /v2/models/demo/infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = head.encode() + body
    lat: list[float] = []
    codes: dict[int, int] = {}
    end = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < end:
                t = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t)
                code = int(status_line.split()[1])
                codes[code] = codes.get(code, 0) + 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(lat) / wall,
        "n": len(lat),
        "5xx_not_503": sum(v for k, v in codes.items() if k >= 500 and k != 503),
        "503": codes.get(503, 0),
        "non_200": sum(v for k, v in codes.items() if k != 200),
    }


def run(coro: Any) -> Any:
    """Run the load generator on uvloop where installed (it comes with uvicorn[standard]): the client
    shares the server's cores, and uvloop spends less CPU per request than asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, required=True, help="a `keiryo demo` output directory")
    ap.add_argument("--candidate", default="int8", help="the demo's candidate to serve (int8 is the demo's best)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the served session")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds at concurrency 32 (the ratio is their median)")
    ap.add_argument("--soak", type=float, default=0.0, help="soak seconds at concurrency 32 with batching (0: skip)")
    args = ap.parse_args()

    # the package's I/O, as the model describes it (digits: one FP32 input "image" -> "logits")
    demo = publish_demo(args.reuse, args.candidate, "serve")
    work, pub, x = demo.work, demo.pub, demo.x
    body, headers = binary_request(x, demo.input["name"], demo.manifest["outputs"][0]["name"])
    bare = bare_p50_ms(demo.model, {demo.input["name"]: x}, args.threads)

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    rows: dict[tuple[str, int], dict[str, float]] = {}
    ratios: list[float] = []
    try:
        for label, max_batch in (("batching", 32), ("no batching", 1)):
            servers[label] = start_server(work / "registry", pub, max_batch, args.threads)
        for label, (_, url) in servers.items():
            run(closed_loop(url, body, headers, 8, 2.0))  # warm-up
            for conc in (1, 8):
                rows[(label, conc)] = run(closed_loop(url, body, headers, conc, args.seconds))
        # concurrency 32, the ratio's level: the two servers take turns, round after round, so that
        # drift on the shared machine touches both; the row shown is the round with the median ratio
        rounds = []
        for _ in range(args.rounds):
            rounds.append({label: run(closed_loop(url, body, headers, 32, args.seconds)) for label, (_, url) in servers.items()})
            ratios.append(rounds[-1]["batching"]["rps"] / rounds[-1]["no batching"]["rps"])
        median_round = rounds[sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]]
        for label in servers:
            rows[(label, 32)] = median_round[label]
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    c = cpu()
    print(
        f"\nCPU: {c['model']}, {os.cpu_count()} cores (client and server share them); model: demo {args.candidate} ONNX, "
        f"{args.threads} session thread(s); binary tensor extension; {args.seconds:.0f} s per level, closed loop on loopback\n"
    )
    print(f"bare onnxruntime session call, batch 1: p50 {bare:.3f} ms\n")
    print(f"{'server':12} {'conc':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'requests':>9} {'non-200':>8}")
    for (label, conc), r in sorted(rows.items(), key=lambda kv: (kv[0][0] != "batching", kv[0][1])):
        print(
            f"{label:12} {conc:4d} {r['p50']:8.3f} {r['p95']:8.3f} {r['p99']:8.3f} {r['rps']:8.0f} {r['n']:9d} {r['non_200']:8d}"
        )
    added = rows[("batching", 1)]["p50"] - bare
    ratio = statistics.median(ratios)
    print(f"\nthroughput ratio at concurrency 32, round by round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    checks = [
        ("added p50 over a bare onnxruntime call at concurrency 1 <= 0.4 ms (binary)", added <= 0.4, f"{added:.3f} ms"),
        (
            "throughput at concurrency 32: batching >= 2.5x no batching (median round)",
            ratio >= 2.5,
            f"{ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x)",
        ),
        (
            "no 5xx in the sweep",
            all(r["5xx_not_503"] == 0 for r in rows.values()),
            str({k: r["5xx_not_503"] for k, r in rows.items()}),
        ),
    ]
    if args.soak:
        proc, url = start_server(work / "registry", pub, 32, args.threads)
        try:
            run(closed_loop(url, body, headers, 32, 5.0))
            rss0 = _rss_mb(proc.pid)
            soak = run(closed_loop(url, body, headers, 32, args.soak))
            rss1 = _rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
        growth = (rss1 - rss0) / rss0 * 100
        print(
            f"\nsoak {args.soak:.0f} s at concurrency 32 with batching: {soak['n']} requests, {soak['rps']:.0f} req/s, "
            f"p99 {soak['p99']:.2f} ms, 503 {soak['503']}, other 5xx {soak['5xx_not_503']}, RSS {rss0:.1f} -> {rss1:.1f} MB"
        )
        checks += [
            ("soak: no 5xx except intended 503s", soak["5xx_not_503"] == 0, f"{soak['5xx_not_503']} (503: {soak['503']})"),
            ("soak: RSS growth < 10%", growth < 10, f"{growth:+.1f}%"),
        ]
    return report(checks, work)


if __name__ == "__main__":
    raise SystemExit(main())
