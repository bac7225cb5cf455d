#!/usr/bin/env python
"""The gRPC endpoint's added latency over a bare onnxruntime call (issue 14, point 3).

Packages a `keiryo demo` candidate (int8 by default), publishes it in a temporary registry and starts
`keiryo serve --grpc-port` in its own process (dynamic batching on unless --max-batch-size 1). Measures, on the
same input (batch 1, raw_input_contents / the binary extension):

- a bare onnxruntime session call in this process (p50 of 2,000 after 200 warm-up runs);
- gRPC ModelInfer at concurrency 1 from ``h2load`` (nghttp2's HTTP/2 load generator, Debian's nghttp2-client: a
  neutral C client, as wrk is for REST), one connection, one stream at a time, the request framed as gRPC; its
  per-request log gives the p50 (of --calls after 200 warm-up calls), and every answer is checked to carry the
  same bytes as a successful reply; this is the figure the issue's 0.4 ms is checked against;
- gRPC ModelInfer at concurrency 1 from a plain Python `grpc` channel with keiryo's stubs (p50 of --calls);
- gRPC ServerLive at concurrency 1: an RPC that does no work, the transport's own floor;
- REST binary at concurrency 1 with bench/serve.py's minimal HTTP/1.1 client, for comparison;
- the floor (``_grpc_floor.py``): the least a Python gRPC server can do for the same ModelInfer, a ``grpc.aio``
  server on uvloop and a synchronous ``grpc.server``, each decoding the raw contents, running the same model on
  the handler's thread and answering, with nothing else (no key, checks, metrics, log or batcher), measured by
  h2load beside keiryo: what grpcio itself adds to the bare call on this machine;
- gRPC throughput at concurrency 8 and 32 (closed loop, grpc.aio client on one thread).

The added p50 is the served p50 minus the bare p50. Client and server share the machine's cores.

    .venv/bin/python bench/serve_grpc.py --reuse keiryo-demo        # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _checks import report
from _serving import publish_demo
from serve import KEY, binary_request, closed_loop, run

from keiryo.machine import cpu
from keiryo.runtime import open_session


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(registry: Path, pub: Path, grpc_port: int, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    """`keiryo serve` with the gRPC endpoint, as bench/serve.py starts it (its keys, no polling)."""
    import httpx

    port = _port()
    cmd = [str(Path(sys.executable).with_name("keiryo")), "serve", "--registry", str(registry), "--model", "demo@production"]
    cmd += ["--public-key", str(pub), "--port", str(port), "--grpc-port", str(grpc_port), "--poll-s", "0"]
    cmd += ["--max-batch-size", str(max_batch), "--max-queue", "1024", "--threads", str(threads)]
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


def h2load_p50(port: int, method: str, message: bytes, calls: int, reply: int, workdir: Path) -> tuple[float, bool]:
    """p50 (ms) of ``calls`` sequential gRPC calls of ``method`` made by h2load, after 200 warm-up calls; and whether
    every answer carried ``reply`` bytes of gRPC data (a failed call answers with trailers only)."""
    import struct

    body, log = workdir / f"{method}.grpc", workdir / f"{method}.log"
    body.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)  # uncompressed, length-prefixed
    log.unlink(missing_ok=True)  # h2load appends to its log
    n = calls + 200
    cmd = ["h2load", "-n", str(n), "-c", "1", "-m", "1", "-t", "1", "-d", str(body), "--log-file", str(log)]
    cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", f"authorization: Bearer {KEY}"]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/inference.GRPCInferenceService/{method}"], capture_output=True, text=True
    )
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    ok = out.returncode == 0 and len(rows) == n and all(r[1] == "200" for r in rows)
    traffic = next((line for line in out.stdout.splitlines() if line.startswith("traffic:")), "")
    data = int(traffic.split("headers")[1].split("(")[-1].split(")")[0]) if "headers" in traffic else -1
    ok = ok and data == n * (reply + 5)
    return statistics.median(int(r[2]) for r in rows[200:]) / 1000, ok


def start_floor(model: Path, mode: str, threads: int) -> tuple[subprocess.Popen, int]:
    """``_grpc_floor.py`` in its own process (``mode``: aio or sync), listening once this returns."""
    port = _port()
    cmd = [sys.executable, str(Path(__file__).with_name("_grpc_floor.py")), str(model), str(port), mode, str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the {mode} floor server did not start")
    return proc, port


def _request(pb: Any, x: np.ndarray, inp: str) -> Any:
    req = pb.ModelInferRequest(model_name="demo")
    req.inputs.add(name=inp, datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    return req


async def grpc_closed_loop(address: str, req: Any, conc: int, seconds: float) -> dict[str, float]:
    import shutil

    import grpc

    if shutil.which("h2load") is None:
        raise SystemExit("h2load is not installed: apt-get install nghttp2-client")

    from keiryo.serve._oip import grpc_predict_v2_pb2_grpc as pb_grpc

    md = (("authorization", f"Bearer {KEY}"),)
    lat: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await stub.ModelInfer(req, metadata=md)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(lat) / wall,
        "n": len(lat),
        "errors": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, required=True, help="a `keiryo demo` output directory")
    ap.add_argument("--candidate", default="int8", help="the demo's candidate to serve")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the served (and the bare) session")
    ap.add_argument("--calls", type=int, default=2000, help="sequential calls at concurrency 1")
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput level")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the server's dynamic batching (1: off)")
    args = ap.parse_args()

    import shutil

    import grpc

    if shutil.which("h2load") is None:
        raise SystemExit("h2load is not installed: apt-get install nghttp2-client")

    from keiryo.serve._oip import grpc_predict_v2_pb2 as pb
    from keiryo.serve._oip import grpc_predict_v2_pb2_grpc as pb_grpc

    demo = publish_demo(args.reuse, args.candidate, "grpc")
    work, pub, pkg, manifest, inp, x = demo.work, demo.pub, demo.pkg, demo.manifest, demo.input, demo.x
    outp = manifest["outputs"][0]

    with open_session("onnxruntime", pkg / manifest["model_file"], args.threads) as s:
        feed = {inp["name"]: x}
        for _ in range(200):
            s.run(feed)
        ts = []
        for _ in range(2000):
            t = time.perf_counter()
            s.run(feed)
            ts.append(time.perf_counter() - t)
        want = np.asarray(s.run(feed)[0], np.float32)
    bare = statistics.median(ts) * 1000

    gport = _port()
    proc, url = start_server(work / "registry", pub, gport, args.max_batch_size, args.threads)
    try:
        req = _request(pb, x, inp["name"])
        md = (("authorization", f"Bearer {KEY}"),)
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            answer = stub.ModelInfer(req, metadata=md)
            got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(want.shape)
            same = bool(np.array_equal(got, want))
            h2 = h2load_p50(gport, "ModelInfer", req.SerializeToString(), args.calls, answer.ByteSize(), work)
            h2_live = h2load_p50(gport, "ServerLive", b"", args.calls, stub.ServerLive(pb.ServerLiveRequest()).ByteSize(), work)
            for _ in range(200):
                stub.ModelInfer(req, metadata=md)
            g = []
            for _ in range(args.calls):
                t = time.perf_counter()
                stub.ModelInfer(req, metadata=md)
                g.append(time.perf_counter() - t)
            live = []  # the transport's floor: an RPC that does nothing (no key, no model, no batcher)
            for _ in range(args.calls):
                t = time.perf_counter()
                stub.ServerLive(pb.ServerLiveRequest())
                live.append(time.perf_counter() - t)
        grpc_p50 = statistics.median(g) * 1000
        live_p50 = statistics.median(live) * 1000
        grpc_p99 = float(np.percentile(np.array(g) * 1000, 99))
        body, headers = binary_request(x, inp["name"], outp["name"])
        run(closed_loop(url, body, headers, 1, 1.0))  # warm-up
        rest = run(closed_loop(url, body, headers, 1, args.seconds))
        loads = {c: run(grpc_closed_loop(f"127.0.0.1:{gport}", req, c, args.seconds)) for c in (8, 32)}
    finally:
        proc.terminate()
        proc.wait(30)
    floors = {}  # mode -> (ModelInfer p50, ServerLive p50, every call answered in full), by h2load
    for mode in ("aio", "sync"):
        fproc, fport = start_floor(pkg / manifest["model_file"], mode, args.threads)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{fport}") as ch:
                fstub = pb_grpc.GRPCInferenceServiceStub(ch)
                freply = fstub.ModelInfer(req)
                fsame = np.array_equal(np.frombuffer(freply.raw_output_contents[0], "<f4").reshape(want.shape), want)
                flive = fstub.ServerLive(pb.ServerLiveRequest()).ByteSize()
            fi = h2load_p50(fport, "ModelInfer", req.SerializeToString(), args.calls, freply.ByteSize(), work)
            fl = h2load_p50(fport, "ServerLive", b"", args.calls, flive, work)
            floors[mode] = (fi[0], fl[0], fi[1] and fl[1] and bool(fsame))
        finally:
            fproc.terminate()
            fproc.wait(30)

    c = cpu()
    print(
        f"\nCPU: {c['model']}, {os.cpu_count()} cores (client and server share them); model: demo {args.candidate} ONNX, "
        f"{args.threads} session thread(s); batch 1; --max-batch-size {args.max_batch_size}\n"
    )
    print(f"bare onnxruntime session call: p50 {bare:.3f} ms")
    print(f"gRPC ModelInfer, concurrency 1, h2load (raw contents, {args.calls} calls): p50 {h2[0]:.3f} ms")
    print(f"gRPC ServerLive, concurrency 1, h2load (an empty RPC: the server's floor): p50 {h2_live[0]:.3f} ms")
    print(f"gRPC ModelInfer, concurrency 1, Python grpc client: p50 {grpc_p50:.3f} ms, p99 {grpc_p99:.3f} ms")
    print(f"gRPC ServerLive (an empty RPC: the Python gRPC client + grpc.aio server floor): p50 {live_p50:.3f} ms")
    print(f"REST binary, concurrency 1 ({rest['n']} calls): p50 {rest['p50']:.3f} ms, p99 {rest['p99']:.3f} ms")
    for conc, r in loads.items():
        print(
            f"gRPC closed loop, concurrency {conc}: {r['rps']:.0f} req/s, p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms, errors {r['errors']}"
        )
    added, added_py = h2[0] - bare, grpc_p50 - bare
    print(
        f"\nadded p50 over the bare call: gRPC {added:.3f} ms (h2load; {added_py:.3f} ms from the Python client), "
        f"REST binary {rest['p50'] - bare:.3f} ms"
    )
    print(
        f"of the gRPC added p50 (h2load), the empty RPC's round trip {h2_live[0]:.3f} ms, the server's own work "
        f"{added - h2_live[0]:.3f} ms; the Python client's empty RPC {live_p50:.3f} ms"
    )
    for mode, (fi_p50, fl_p50, _) in floors.items():
        name = "grpc.aio on uvloop" if mode == "aio" else "grpc.server, a 1-thread pool"
        print(
            f"the floor, {name} (_grpc_floor.py; the model run and nothing else), h2load: ModelInfer p50 {fi_p50:.3f} ms "
            f"(added {fi_p50 - bare:.3f} ms), ServerLive p50 {fl_p50:.3f} ms"
        )
    best_floor = min(f[0] for f in floors.values()) - bare
    print(f"keiryo's gRPC added p50 {added:.3f} ms against grpcio's own floor of {best_floor:.3f} ms added")
    checks = [
        ("gRPC output bit-identical to the bare session's", same, str(same)),
        ("the floor servers answer every call, with the same output", all(f[2] for f in floors.values()), str(floors)),
        ("every h2load call answered with a full reply", h2[1] and h2_live[1], f"{h2[1]}, {h2_live[1]}"),
        ("gRPC added p50 over a bare onnxruntime call at concurrency 1 <= 0.4 ms (h2load)", added <= 0.4, f"{added:.3f} ms"),
        (
            "no gRPC errors under load",
            all(r["errors"] == 0 for r in loads.values()),
            str({k: r["errors"] for k, r in loads.items()}),
        ),
    ]
    return report(checks, work)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
