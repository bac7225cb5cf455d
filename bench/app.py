#!/usr/bin/env python
"""The real-time page (issue 16): end-to-end latency of both engines, page load, and the browser as a runtime.

Serves the demo's registry (``keiryo demo`` output; digits 2.0.0 int8 at production, 1.0.0 fp32 at staging) with
``/app`` on loopback, drives the page in headless Chromium (Playwright) and reads the page's own latency panel:

- page load: from navigation to the first model ready on the server engine, and then to the in-browser engine
  ready (onnxruntime-web's 14 MB wasm fetched and compiled), fresh browser context (cold cache) each run;
- end to end, canvas -> rendered result (DOM updated): a digit is drawn, then --frames pointer moves each
  classify the pad; p50 / p95 of the page's stages (preprocessing, network, inference, total) per engine;
- the browser as a runtime: int8 and fp32 p50 in Chromium (onnxruntime-web, timed in the page) beside native
  onnxruntime on the same CPU, batch 1, 1 thread; the ratio printed.

    .venv/bin/python bench/app.py --demo keiryo-demo
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _checks import cpu_line, report

from keiryo.app import create_page_app, registry_refs
from keiryo.app.demo import ensure_demo_registry
from keiryo.packages.remote import open_registry
from keiryo.runtime.web import launch_chromium
from keiryo.serve import ServeSettings
from keiryo.testing.live import LiveServer


def _wait_ready(page, engine: str, timeout: float = 60_000) -> None:
    page.wait_for_function(
        "(e) => (document.body.dataset.ready || '').endsWith(':' + e)", arg=engine, timeout=timeout, polling="raf"
    )


def page_load(browser, url: str, runs: int) -> dict[str, float]:
    """Cold cache each run: navigation -> first model ready on the server engine; -> the in-browser engine
    warmed up in the background (wasm fetched and compiled, session made: every asset loaded); the switch."""
    server, both, switch, kb = [], [], [], []
    for _ in range(runs):
        ctx = browser.new_context()
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(url)
        _wait_ready(page, "server")
        t1 = time.perf_counter()
        page.wait_for_function("() => !!document.body.dataset.warm", timeout=60_000, polling="raf")
        t2 = time.perf_counter()
        page.locator("input[name=engine][value=browser]").check()
        _wait_ready(page, "browser")
        t3 = time.perf_counter()
        kb.append(page.evaluate("() => performance.getEntriesByType('resource').reduce((a, r) => a + r.transferSize, 0)") / 1024)
        server.append((t1 - t0) * 1e3)
        both.append((t2 - t0) * 1e3)
        switch.append((t3 - t2) * 1e3)
        ctx.close()
    med = statistics.median
    return {"server_ready_ms": med(server), "all_assets_ms": med(both), "switch_ms": med(switch), "kib": med(kb)}


def end_to_end(browser, url: str, engine: str, frames: int) -> dict[str, dict[str, float]]:
    ctx = browser.new_context(viewport={"width": 1100, "height": 760})
    page = ctx.new_page()
    page.goto(url)
    _wait_ready(page, "server")
    if engine == "browser":
        page.locator("input[name=engine][value=browser]").check()
        _wait_ready(page, "browser")
    page.evaluate(f"() => {{ window.keiryoApp.window.size = {frames}; }}")
    box = page.locator("#pad").bounding_box()
    x0, y0 = box["x"] + 60, box["y"] + 40
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + 120, y0 + 10, steps=10)  # a 7
    page.mouse.move(x0 + 40, y0 + 180, steps=10)
    page.mouse.up()
    page.evaluate("() => window.keiryoApp.window.clear()")
    page.mouse.move(x0 + 40, y0 + 180)
    page.mouse.down()
    for i in range(frames * 3):  # each move schedules a frame; one is in flight at a time (latest wins)
        page.mouse.move(x0 + 40 + (i % 7), y0 + 180 - (i % 5))
        if page.evaluate("() => window.keiryoApp.window.rows.length") >= frames:
            break
    page.mouse.up()
    rows = page.evaluate("() => window.keiryoApp.window.rows")
    ctx.close()
    out = {}
    for k in ("prep", "network", "inference", "total"):
        v = np.asarray([r[k] for r in rows], dtype=float)
        out[k] = {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "n": len(v)}
    return out


def runtimes(paths: dict[str, Path], test: dict[str, np.ndarray], iterations: int) -> dict[str, dict[str, float]]:
    from keiryo.benchmark import BenchConfig, run_benchmark
    from keiryo.runtime import open_session

    cfg = BenchConfig(threads=1, warmup=20, iterations=iterations, throughput_iterations=2)
    sample = {k: v[:1] for k, v in test.items()}
    out = {}
    for name, path in paths.items():
        with open_session("onnxruntime", path, 1) as s:
            native = run_benchmark(s, sample, cfg).latency_p50_ms
            ref = s.run(test)[0]
        with open_session("web", path, 1) as w:
            web = run_benchmark(w, sample, cfg).latency_p50_ms
            got = w.run(test)[0]
            info = w.info
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        out[name] = {"native_p50": native, "web_p50": web, "ratio": web / native, "info": info, "agree": agree,
                     "max_diff": float(np.abs(got - ref).max()), "n": len(ref)}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("keiryo-demo"), help="keiryo demo's output (run if missing)")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=300)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from keiryo.report.results import read_results

    root, pub = ensure_demo_registry(args.demo)
    reg = open_registry(root, None, args.demo / "app" / "bench-tuf-cache")
    reg.refresh()
    settings = ServeSettings(models=registry_refs(reg), public_key=str(pub), allow_anonymous=True, poll_s=2)
    app, _ = create_page_app(reg, settings)
    with LiveServer(app) as srv, sync_playwright() as p:
        url = f"{srv.url}/app/"
        browser = launch_chromium(p)
        load = page_load(browser, url, args.loads)
        e2e = {e: end_to_end(browser, url, e, args.frames) for e in ("server", "browser")}
        browser.close()
    res = read_results(args.demo)
    paths = {c["name"]: args.demo / c["artifact"] for c in res["candidates"] if c["name"] in ("fp32", "int8")}
    from keiryo.data import DataSpec, load_data
    from keiryo.demo import DEMO_DATA

    data = load_data(DataSpec(**{**DEMO_DATA.model_dump(), "calib_size": 8}))
    rt = runtimes(paths, data.test.numpy(), args.iterations)

    print(f"\nCPU: {cpu_line(1)}")
    info = next(iter(rt.values()))["info"]
    simd, thr = "on" if info["simd"] else "off", info["wasm_threads"]
    print(f"browser: {info['browser']}, onnxruntime-web {info['onnxruntime_web']}, wasm SIMD {simd}, {thr} thread(s)")
    print(
        f"\npage load (median of {args.loads}, cold cache): first model ready on the server engine {load['server_ready_ms']:.0f} ms;"
    )
    print(f"  every asset incl. the in-browser engine ready {load['all_assets_ms']:.0f} ms ({load['kib']:.0f} KiB transferred);")
    print(f"  then switching to the in-browser engine {load['switch_ms']:.0f} ms")
    print("\nend to end, canvas -> rendered (ms)   prep p50   network p50   inference p50   total p50   total p95   frames")
    for e, r in e2e.items():
        print(
            f"  {e:<36}{r['prep']['p50']:>9.2f}{r['network']['p50']:>14.2f}{r['inference']['p50']:>16.2f}"
            f"{r['total']['p50']:>12.2f}{r['total']['p95']:>12.2f}{r['total']['n']:>9d}"
        )
    print("\nthe browser as a runtime, batch 1, 1 thread (ms)   native onnxruntime p50   onnxruntime-web p50   web/native")
    for n, r in rt.items():
        print(f"  demo {n:<44}{r['native_p50']:>23.3f}{r['web_p50']:>22.3f}{r['ratio']:>12.2f}x")
    for n, r in rt.items():
        print(
            f"  parity {n}: top-1 agreement web vs native {r['agree']:.2%} on {r['n']} test digits, max |diff| {r['max_diff']:.2g}"
        )
    web_int8, web_fp32 = rt["int8"]["web_p50"], rt["fp32"]["web_p50"]
    print(f"  int8 vs fp32 in the browser: {web_fp32 / web_int8:.2f}x {'faster' if web_int8 < web_fp32 else 'SLOWER (the trap)'}")
    checks = [
        (
            "server engine p50 end to end <= 15 ms",
            e2e["server"]["total"]["p50"] <= 15.0,
            f"{e2e['server']['total']['p50']:.2f} ms",
        ),
        ("page loads (all assets) <= 1.5 s", load["all_assets_ms"] <= 1500, f"{load['all_assets_ms']:.0f} ms"),
        *[(f"{n}: web/native top-1 agreement >= 99.5%", r["agree"] >= 0.995, f"{r['agree']:.2%}") for n, r in rt.items()],
    ]
    return report(checks, args.demo / "app")


if __name__ == "__main__":
    raise SystemExit(main())
