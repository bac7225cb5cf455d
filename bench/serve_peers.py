#!/usr/bin/env python
"""keiryo serve beside the peer servers (issue 14, point 7), one neutral load generator, one run.

The demo's int8 model, served by:
  - keiryo, with dynamic batching (max batch 32) and without (max batch 1), its defaults otherwise (the idle
    fast path on);
  - MLServer 1.7 with a custom onnxruntime runtime, with its adaptive batching (max batch 32, 2 ms) and without;
  - KServe's Python model server with a custom onnxruntime model;
  - a plain FastAPI + onnxruntime app (orjson), the 30-line baseline;
each in its own virtual environment (``.bench-envs/NAME``, made by ``--setup``), every session with the same
intra-op threads. ``wrk`` (Debian's package; one load-generator thread) posts the same OIP v2 JSON request
at 1, 8 and 32 connections; throughput, p50, p99 and errors are wrk's. The added latency is the p50 at one
connection minus a bare onnxruntime call on the same input in this process. At one connection the servers
take --rounds turns of --round-seconds each and every row shows its median round (by p50): the p50 of a single
run moves by a tenth of a millisecond from one run to the next on a shared 2-vCPU machine, ten times the
differences between the fastest servers, so keiryo's p50 is also compared with the fastest peer's round by
round (they took turns within seconds of each other). The higher levels run once, for --seconds.

    .venv/bin/python bench/serve_peers.py --setup            # once: the peers' environments (a few minutes)
    .venv/bin/python bench/serve_peers.py --reuse keiryo-demo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _checks import cpu_line, report
from _serving import bare_p50_ms, publish_demo

from keiryo.testing.live import free_port

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / ".bench-envs"
KEY = "bench-key-0123456789abcdef"
PEER_PACKAGES = {
    # uvloop 0.22+ makes asyncio.get_event_loop() raise in a fresh thread, which MLServer 1.7.1's parallel
    # inference workers call at start (they exit at once); 0.21 is the release it was made with
    "mlserver": ["mlserver==1.7.1", "uvloop==0.21.0", "onnxruntime", "numpy"],
    "kserve": ["kserve", "onnxruntime", "numpy"],
    "fastapi": ["fastapi", "uvicorn[standard]", "onnxruntime", "numpy", "orjson"],
}

FASTAPI_APP = """
import onnxruntime as ort, numpy as np, orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
so = ort.SessionOptions(); so.intra_op_num_threads = {threads}; so.inter_op_num_threads = 1
sess = ort.InferenceSession({model!r}, so, providers=["CPUExecutionProvider"])
app = FastAPI()
@app.get("/v2/health/ready")
def ready(): return {{"ready": True}}
@app.post("/v2/models/demo/infer")
async def infer(request: Request):
    body = orjson.loads(await request.body())
    i = body["inputs"][0]
    x = np.asarray(i["data"], dtype=np.float32).reshape(i["shape"])
    y = sess.run(None, {{i["name"]: x}})[0]
    out = {{"model_name": "demo", "outputs": [{{"name": "logits", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}}]}}
    return Response(orjson.dumps(out), media_type="application/json")
"""

MLSERVER_RUNTIME = """
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

class OrtModel(MLModel):
    async def load(self) -> bool:
        so = ort.SessionOptions(); so.intra_op_num_threads = {threads}; so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(self.settings.parameters.uri, so, providers=["CPUExecutionProvider"])
        self.input = self.sess.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self.sess.run(None, {{self.input: x}})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", y)])
"""

KSERVE_APP = """
import sys
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

class OrtModel(Model):
    def __init__(self, name):
        super().__init__(name)
        so = ort.SessionOptions(); so.intra_op_num_threads = {threads}; so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession({model!r}, so, providers=["CPUExecutionProvider"])
        self.input = self.sess.get_inputs()[0].name
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        y = self.sess.run(None, {{self.input: x}})[0]
        out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "0")

if __name__ == "__main__":
    ModelServer(http_port={port}, grpc_port={grpc_port}, workers=1, enable_docs_url=False).start([OrtModel("demo")])
"""


def setup() -> None:
    for name, pkgs in PEER_PACKAGES.items():
        env = ENVS / name
        if not (env / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        print(f"installing {name}: {' '.join(pkgs)}", flush=True)
        subprocess.run([str(env / "bin" / "pip"), "install", "-q", *pkgs], check=True)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")


def wait_ready(url: str, proc: subprocess.Popen, what: str, path: str = "/v2/health/ready") -> None:
    end = time.time() + 120
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not become ready")


def start_peers(work: Path, model: Path, threads: int, registry: Path, pub: Path) -> dict[str, tuple[subprocess.Popen, str, str]]:
    """name -> (process, base url, infer path)."""
    out: dict[str, tuple[subprocess.Popen, str, str]] = {}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    keiryo = str(Path(sys.executable).with_name("keiryo"))
    for label, batch in (("keiryo batched", 32), ("keiryo unbatched", 1)):
        port = free_port()
        cmd = [keiryo, "serve", "--registry", str(registry), "--model", "demo@production", "--public-key", str(pub)]
        cmd += [
            "--port",
            str(port),
            "--max-batch-size",
            str(batch),
            "--max-queue",
            "1024",
            "--poll-s",
            "0",
            "--threads",
            str(threads),
        ]
        p = subprocess.Popen(cmd, env={**os.environ, "KEIRYO_API_KEYS": KEY}, **quiet)
        out[label] = (p, f"http://127.0.0.1:{port}", "/v2/models/demo/infer")
    # FastAPI
    d = work / "fastapi"
    d.mkdir()
    (d / "peer_fastapi.py").write_text(FASTAPI_APP.format(threads=threads, model=str(model)))
    port = free_port()
    cmd = [
        str(ENVS / "fastapi/bin/uvicorn"),
        "peer_fastapi:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    out["FastAPI + onnxruntime"] = (subprocess.Popen(cmd, cwd=d, **quiet), f"http://127.0.0.1:{port}", "/v2/models/demo/infer")
    # MLServer, with and without adaptive batching
    for label, batching in (("MLServer", None), ("MLServer adaptive batching", (32, 0.002))):
        d = work / label.replace(" ", "-")
        (d / "demo").mkdir(parents=True)
        (d / "peer_mlserver.py").write_text(MLSERVER_RUNTIME.format(threads=threads))
        port = free_port()
        (d / "settings.json").write_text(json.dumps({"http_port": port, "grpc_port": free_port(), "metrics_port": free_port()}))
        ms = {"name": "demo", "implementation": "peer_mlserver.OrtModel", "parameters": {"uri": str(model)}}
        if batching:
            ms.update(max_batch_size=batching[0], max_batch_time=batching[1])
        (d / "demo" / "model-settings.json").write_text(json.dumps(ms))
        env = {**os.environ, "PYTHONPATH": str(d)}
        p = subprocess.Popen([str(ENVS / "mlserver/bin/mlserver"), "start", str(d)], cwd=d, env=env, **quiet)
        out[label] = (p, f"http://127.0.0.1:{port}", "/v2/models/demo/infer")
    # KServe
    d = work / "kserve"
    d.mkdir()
    port = free_port()
    (d / "peer_kserve.py").write_text(KSERVE_APP.format(threads=threads, model=str(model), port=port, grpc_port=free_port()))
    p = subprocess.Popen([str(ENVS / "kserve/bin/python"), "peer_kserve.py"], cwd=d, **quiet)
    out["KServe"] = (p, f"http://127.0.0.1:{port}", "/v2/models/demo/infer")
    try:
        for label, (p, url, _) in out.items():
            wait_ready(url, p, label, "/v2/models/demo/ready" if label.startswith(("MLServer", "KServe")) else "/v2/health/ready")
    except BaseException:
        stop(out)
        raise
    return out


def stop(servers: dict[str, tuple[subprocess.Popen, str, str]]) -> None:
    for p, _, _ in servers.values():
        p.terminate()
    for p, _, _ in servers.values():
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def _cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds so far of every thread of ``pid`` and of its child processes, by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    pids = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                stat = Path(f"/proc/{p}/task/{t}/stat").read_text()
            except OSError:
                continue
            # Python names no OS threads: the main thread is the event loop, the others run sessions and pools
            if p != pid:
                name = "child processes"
            else:
                name = "main thread (event loop)" if t == str(p) else "other threads (session, pools)"
            fields = stat[stat.rindex(")") + 2 :].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def wrk(url: str, body: bytes, conns: int, seconds: float, work: Path, pid: int | None = None) -> dict[str, Any]:
    lua = work / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body.decode()}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
    )
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", str(lua), url]
    before = _cpu_by_thread(pid) if pid else {}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = _cpu_by_thread(pid) if pid else {}

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    cpu = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0.01 * seconds}
    cpu["wrk (load generator)"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"rps": rps, "p50": ms("50%"), "p99": ms("99%"), "errors": errors, "requests": total, "cpu": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create the peers' environments in .bench-envs/ and exit")
    ap.add_argument("--reuse", type=Path, help="a `keiryo demo` output directory")
    ap.add_argument("--candidate", default="int8")
    ap.add_argument("--seconds", type=float, default=8.0, help="per server and concurrency")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every server's session")
    ap.add_argument("--conns", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=15, help="turns at the lowest concurrency (the median round is shown)")
    ap.add_argument("--round-seconds", type=float, default=2.0, help="length of each turn at the lowest concurrency")
    args = ap.parse_args()
    if args.setup:
        setup()
        return 0
    if args.reuse is None:
        ap.error("--reuse DIR is needed (a keiryo demo output)")
    missing = [n for n in PEER_PACKAGES if not (ENVS / n / "bin" / "python").exists()]
    if missing or shutil.which("wrk") is None:
        raise SystemExit(f"missing peer environments {missing} or wrk: run with --setup (and apt-get install wrk)")

    demo = publish_demo(args.reuse, args.candidate, "peers")
    work, pub, inp, shape, x, model = demo.work, demo.pub, demo.input, demo.shape, demo.x, demo.model
    body = json.dumps(
        {"inputs": [{"name": inp["name"], "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()
    bare = bare_p50_ms(model, {inp["name"]: x}, args.threads)

    conns = [int(c) for c in args.conns.split(",")]
    servers = start_peers(work, model, args.threads, demo.registry, pub)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for label, (_, url, path) in servers.items():  # every server answers the same request first
            r = httpx.post(
                url + path, content=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
            )
            if r.status_code != 200:
                raise RuntimeError(f"{label}: {r.status_code} {r.text[:200]}")
            wrk(url + path, body, 4, 2, work)  # warm-up
        for c in conns:  # servers take turns per level, so drift on the shared machine hits all alike
            turns: dict[str, list[dict[str, Any]]] = {}
            lowest = c == min(conns)
            for _ in range(args.rounds if lowest else 1):
                for label, (_, url, path) in servers.items():
                    seconds = args.round_seconds if lowest else args.seconds
                    turns.setdefault(label, []).append(wrk(url + path, body, c, seconds, work, servers[label][0].pid))
            if lowest:
                by_round = {label: [r["p50"] for r in runs] for label, runs in turns.items()}
            for label, runs in turns.items():
                rows.setdefault(label, {})[c] = sorted(runs, key=lambda r: r["p50"])[len(runs) // 2]
                if len(runs) > 1:
                    p50s = ", ".join(f"{r['p50']:.2f}" for r in runs)
                    print(f"{label} c={c} p50 by round: {p50s} ms", flush=True)
    finally:
        stop(servers)

    print(f"\nCPU: {cpu_line(args.threads)}; load generator: wrk, 1 thread, OIP v2 JSON; bare onnxruntime call p50 {bare:.3f} ms")
    head = "server".ljust(30) + "".join(f"   c={c}: req/s    p50 ms    p99 ms  errors" for c in conns) + "   added p50 @c=1"
    print(head)
    for label, r in rows.items():
        cells = "".join(f"{r[c]['rps']:>16.0f}{r[c]['p50']:>10.2f}{r[c]['p99']:>10.2f}{r[c]['errors']:>8d}" for c in conns)
        print(f"{label:<30}{cells}{r[conns[0]]['p50'] - bare:>17.2f}")
    top = max(conns)
    print(f"\nwhere the time goes at c={top}: CPU ms per request, by thread (server process and its children; wrk)")
    for label, r in rows.items():
        cpu = r[top]["cpu"]
        per = {k: v * 1e3 / max(1, r[top]["requests"]) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}
        total = sum(v for k, v in per.items() if not k.startswith("wrk"))
        parts = ", ".join(f"{k} {v:.3f}" for k, v in per.items())
        print(f"  {label:<28} server {total:.3f} ms/request: {parts}")
    peers = {k: v for k, v in rows.items() if not k.startswith("keiryo")}
    best_peer = max(peers, key=lambda k: peers[k][top]["rps"])
    ratio = rows["keiryo batched"][top]["rps"] / peers[best_peer][top]["rps"]
    added = {k: v[conns[0]]["p50"] - bare for k, v in rows.items()}
    best_added_peer = min((v for k, v in added.items() if not k.startswith("keiryo")))
    keiryo_added = added["keiryo batched"]  # the default configuration
    fastest_peer = min(peers, key=lambda k: added[k])
    paired = [k - p for k, p in zip(by_round["keiryo batched"], by_round[fastest_peer], strict=True)]
    print(f"\nkeiryo batched at c={top}: {ratio:.2f}x the best peer ({best_peer})")
    print(
        f"at c={conns[0]}, round by round (the two took turns): keiryo batched's p50 minus {fastest_peer}'s, median "
        f"{statistics.median(paired) * 1000:+.0f} us; keiryo lower in {sum(d < 0 for d in paired)} of {len(paired)} "
        f"rounds, level in {sum(d == 0 for d in paired)}"
    )
    checks = [
        (f"keiryo batched at c={top} >= 2x the best peer", ratio >= 2.0, f"{ratio:.2f}x vs {best_peer}"),
        (
            "added p50 at c=1 below the best peer's (JSON)",
            keiryo_added < best_added_peer,
            f"{keiryo_added:.2f} vs {best_added_peer:.2f} ms",
        ),
        ("no errors", all(v["errors"] == 0 for r in rows.values() for v in r.values()), "see table"),
    ]
    return report(checks, work)


if __name__ == "__main__":
    raise SystemExit(main())
