"""A rich table of a results.json: one row per model, the best marked."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def results_table(results: dict[str, Any]) -> Table:
    cpu = results["machine"]["cpu"]
    vnni = "int8 dot-product: " + (", ".join(cpu["int8_isa"]) if cpu["int8_dot_product"] else "none")
    title = f"{cpu['model']} ({vnni}), {results['machine'].get('threads', 1)} thread(s)"
    t = Table(title=title, title_style="dim")
    for col, just in [
        ("model", "left"),
        ("format", "left"),
        ("acc %", "right"),
        ("drop pt", "right"),
        ("fidelity %", "right"),
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
    b = results["baseline"]["metrics"]
    t.add_row(
        "baseline",
        "torch",
        f"{b['accuracy'] * 100:.2f}",
        "0.00",
        "100.00",
        "-",
        "-",
        "-",
        f"{b['latency_p50_ms']:.3f}",
        f"{b['latency_p95_ms']:.3f}",
        "-",
        f"{b['throughput_per_s']:.0f}",
        "-",
    )
    for c in results["candidates"]:
        name = c["name"] + (" *" if c["name"] == results.get("best") else "")
        if c.get("status") != "ok":
            t.add_row(name, c.get("format", "failed"), *["-"] * 11, style="red")
            continue
        m = c["metrics"]
        t.add_row(
            name,
            c["format"],
            f"{m['accuracy'] * 100:.2f}",
            f"{m['accuracy_drop']:.2f}",
            f"{m['fidelity'] * 100:.2f}",
            _mb(m["size_bytes"]),
            _mb(m["size_gzip_bytes"]),
            _x(m.get("size_ratio_vs_fp32")),
            f"{m['latency_p50_ms']:.3f}",
            f"{m['latency_p95_ms']:.3f}",
            _x(m.get("speedup_p50_vs_fp32")),
            f"{m['throughput_per_s']:.0f}",
            f"{m['peak_rss_mb']:.0f}" if m.get("peak_rss_mb") else "-",
        )
    cons = results.get("constraints") or []
    cap = "ratios vs the fp32 export on the same runtime; * = best"
    if cons:
        cap += " meeting " + ", ".join(f"{c['metric']} {c['op']} {c['bound']:g}" for c in cons)
    if results.get("best") is None and cons:
        cap += " — no candidate meets the budget"
    t.caption = cap
    return t
