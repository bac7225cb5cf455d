"""A rich table of a results.json: one row per model, the best marked."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _est(m: dict[str, Any], name: str, pct: bool) -> str:
    """``98.33 ±0.66`` (value and half the 95% interval), in % for fractions."""
    v = m.get(name)
    if v is None:
        return "-"
    ci = m.get(f"{name}_ci95")
    scale = 100 if pct else 1
    text = f"{v * scale:.2f}" if pct else f"{v:.4g}"
    if ci and None not in ci:
        half = (ci[1] - ci[0]) / 2 * scale
        text += f" ±{half:.2f}" if pct else f" ±{half:.2g}"
    return text


def results_table(results: dict[str, Any]) -> Table:
    cpu = results["machine"]["cpu"]
    vnni = "int8 dot-product: " + (", ".join(cpu["int8_isa"]) if cpu["int8_dot_product"] else "none")
    title = f"{cpu['model']} ({vnni}), {results['machine'].get('threads', 1)} thread(s)"
    task = results.get("task") or {"primary": "accuracy", "drop": "accuracy_drop", "drop_unit": "pt", "higher_is_better": True}
    primary, drop = task["primary"], task["drop"]
    b = results["baseline"]["metrics"]
    pct = task["higher_is_better"] and isinstance(b.get(primary), float) and 0 <= b[primary] <= 1
    t = Table(title=title, title_style="dim")
    for col, just in [
        ("model", "left"),
        ("format", "left"),
        (f"{primary}{' %' if pct else ''} ±95%", "right"),
        (f"{drop.removesuffix('_pct')} {task['drop_unit']}", "right"),
        ("fidelity ±95%", "right"),
        ("size MB", "right"),
        ("gzip MB", "right"),
        ("x smaller", "right"),
        ("p50 ms", "right"),
        ("p95 ms", "right"),
        ("x faster p50", "right"),
        ("samples/s", "right"),
        ("RSS MB", "right"),
    ]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    fid_pct = isinstance(b.get("fidelity"), float) and b["fidelity"] <= 1
    t.add_row(
        "baseline",
        "torch",
        _est(b, primary, pct),
        "0.00",
        _est(b, "fidelity", fid_pct),
        "-",
        "-",
        "-",
        f"{b['latency_p50_ms']:.3f}",
        f"{b['latency_p95_ms']:.3f}",
        "-",
        f"{b['throughput_per_s']:.0f}",
        "-",
    )
    failures = []
    for c in results["candidates"]:
        name = c["name"] + (" *" if c["name"] == results.get("best") else "")
        if c.get("status") != "ok":
            t.add_row(name, f"failed: {c.get('failed_step') or '?'}", *["-"] * 11, style="red")
            failures.append(f"{c['name']}: {c.get('error', '')}")
            continue
        m = c["metrics"]
        d = m.get(drop)
        t.add_row(
            name,
            c["format"],
            _est(m, primary, pct),
            "-" if d is None else f"{d:.2f}",
            _est(m, "fidelity", fid_pct),
            _mb(m["size_bytes"]),
            _mb(m["size_gzip_bytes"]),
            _x(m.get("size_ratio_vs_fp32")),
            f"{m['latency_p50_ms']:.3f}",
            f"{m['latency_p95_ms']:.3f}",
            _x(m.get("speedup_p50_vs_fp32")) + (" !" if m.get("smaller_but_slower") else ""),
            f"{m['throughput_per_s']:.0f}",
            f"{m['peak_rss_mb']:.0f}" if m.get("peak_rss_mb") else "-",
        )
    cons = results.get("constraints") or []
    n = b.get("samples")
    cap = f"task {task.get('name', '?')} on {n} test samples; ratios vs the fp32 export on the same runtime; * = best"
    if cons:
        cap += " meeting " + ", ".join(f"{c['metric']} {c['op']} {c['bound']:g}" for c in cons)
    if results.get("best") is None and cons:
        cap += " — no candidate meets the budget"
    slower = [c["name"] for c in results["candidates"] if c.get("status") == "ok" and c["metrics"].get("smaller_but_slower")]
    if slower:
        cap += f"\n! smaller but slower than fp32 on this runtime: {', '.join(slower)}"
    infos = [(c.get("metrics") or {}).get("runtime_info") for c in results["candidates"]]
    runtimes = {json.dumps(i, sort_keys=True) for i in infos if i}
    for info in sorted(runtimes):
        i = json.loads(info)
        cap += f"\nmeasured in {i.get('browser', '?')}, onnxruntime-web {i.get('onnxruntime_web', '?')}"
        cap += f" (wasm SIMD {'on' if i.get('simd') else 'off'}, {i.get('wasm_threads', 1)} thread(s))"
    for f in failures:
        cap += f"\nfailed {f[:300]}"
    t.caption = cap
    return t
