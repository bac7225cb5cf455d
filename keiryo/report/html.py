"""``report.html`` (self-contained, opens offline) and ``pareto.png`` for a results.json."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import yaml


def task_of(results: dict[str, Any]) -> tuple[str, str, float]:
    """(primary metric, its drop metric, display scale: 100 for fractions shown in %, else 1)."""
    t = results.get("task") or {"primary": "accuracy", "drop": "accuracy_drop", "higher_is_better": True}
    base = results["baseline"]["metrics"].get(t["primary"])
    scale = 100.0 if t.get("higher_is_better", True) and isinstance(base, float) and 0 <= base <= 1 else 1.0
    return t["primary"], t["drop"], scale


def _budget(results: dict[str, Any]) -> tuple[float | None, float | None]:
    """(the task metric's budget line, highest p95 allowed) from the constraints, for the plot."""
    floor = lat_ceiling = None
    primary, drop, scale = task_of(results)
    base = results["baseline"]["metrics"][primary]
    higher = (results.get("task") or {}).get("higher_is_better", True)
    for c in results.get("constraints", []):
        if c["metric"] == drop:
            if drop.endswith("_pct"):
                floor = base * (1 + c["bound"] / 100)
            else:
                floor = base - c["bound"] / 100 if higher else base + c["bound"] / 100
        elif c["metric"] == primary:
            floor = c["bound"]
        elif c["metric"] == "latency_p95_ms":
            lat_ceiling = c["bound"]
    return (None if floor is None else floor * scale), lat_ceiling


def pareto_png(results: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary, _, scale = task_of(results)
    ok = [c for c in results["candidates"] if c.get("status") == "ok" and c["metrics"].get(primary) is not None]
    front = set(results.get("search", {}).get("pareto_front", []))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    sizes = [c["metrics"]["size_bytes"] for c in ok] or [1]
    smax = max(sizes)
    for c in ok:
        m = c["metrics"]
        meets = not c.get("constraints_violated")
        color = "#1a9850" if meets else "#999999"
        marker = "*" if c["name"] == results.get("best") else ("D" if c["name"] in front else "o")
        ax.scatter(
            m["latency_p95_ms"],
            m[primary] * scale,
            s=40 + 400 * m["size_bytes"] / smax,
            c=color,
            marker=marker,
            alpha=0.75,
            edgecolors="black",
            linewidths=0.5,
        )
        if c["name"] in front or c["name"] in ("fp32", results.get("best")):
            ax.annotate(
                c["name"], (m["latency_p95_ms"], m[primary] * scale), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
    acc_floor, lat_ceiling = _budget(results)
    if acc_floor is not None:
        ax.axhline(acc_floor, color="#d73027", linestyle="--", linewidth=1, label=f"{primary} budget")
    if lat_ceiling is not None:
        ax.axvline(lat_ceiling, color="#4575b4", linestyle="--", linewidth=1, label="latency budget")
    cpu = results["machine"]["cpu"]
    batch = results.get("bench", {}).get("latency_batch", 1)
    ax.set_xlabel(f"p95 latency at batch {batch} (ms), {results['machine'].get('threads', 1)} thread(s)")
    ax.set_ylabel(f"test {primary}" + (" (%)" if scale == 100 else ""))
    ax.set_title(f"candidates on {cpu['model']} (marker size = file size; * best, diamond = Pareto front)", fontsize=9)
    if acc_floor is not None or lat_ceiling is not None:
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const tbody = th.closest('table').tBodies[0];
  const rows = Array.from(tbody.rows);
  const asc = th.dataset.dir !== 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const val = r => { const t = r.cells[i].dataset.v ?? r.cells[i].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  rows.sort((a, b) => { const x = val(a), y = val(b); return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); });
  rows.forEach(r => tbody.appendChild(r));
}));
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f3f3f3;cursor:pointer}
td:first-child,th:first-child{text-align:left} tr.best{background:#e6f5e6} tr.failed{color:#a00}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px} .note{color:#555;font-size:13px}
"""


def _ci(m: dict[str, Any], name: str, scale: float) -> str:
    v, ci = m.get(name), m.get(f"{name}_ci95")
    if v is None:
        return "-"
    text = f"{v * scale:.2f}" if scale == 100 else f"{v:.4g}"
    if ci and None not in ci:
        text += f" [{ci[0] * scale:.2f}, {ci[1] * scale:.2f}]" if scale == 100 else f" [{ci[0]:.4g}, {ci[1]:.4g}]"
    return text


def _row(c: dict[str, Any], best: str | None, results: dict[str, Any]) -> str:
    e = html.escape
    if c.get("status") != "ok":
        why = f"failed at {c.get('failed_step') or '?'}: {c.get('error')}"
        return f'<tr class="failed"><td>{e(c["name"])}</td><td colspan="9" style="text-align:left">{e(why)}</td></tr>'
    primary, drop, scale = task_of(results)
    m = c["metrics"]
    fid_scale = 100.0 if isinstance(m.get("fidelity"), float) and m["fidelity"] <= 1 else 1.0
    cells = [
        (_ci(m, primary, scale), m.get(primary)),
        (f"{m.get(drop, float('nan')):.2f}", m.get(drop)),
        (_ci(m, "fidelity", fid_scale), m.get("fidelity")),
        (f"{m['size_bytes'] / 1e6:.3f}", m["size_bytes"]),
        (f"{m['size_gzip_bytes'] / 1e6:.3f}", m["size_gzip_bytes"]),
        (f"{m['latency_p50_ms']:.3f}", m["latency_p50_ms"]),
        (f"{m['latency_p95_ms']:.3f}", m["latency_p95_ms"]),
        (f"{m.get('macs', 0) / 1e6:.2f}", m.get("macs", 0)),
        ("; ".join(c.get("constraints_violated") or []) or "yes", 0 if c.get("constraints_violated") else 1),
    ]
    cls = ' class="best"' if c["name"] == best else ""
    tds = "".join(f'<td data-v="{v}">{e(t)}</td>' for t, v in cells)
    return f"<tr{cls}><td>{e(c['name'])}</td>{tds}</tr>"


def _vs_kept(r: dict[str, Any]) -> str:
    """How a rung that missed the budget compared with the rung kept before it (``vs_kept``)."""
    v = r.get("vs_kept")
    return "" if not v else f"{html.escape(str(v['rung']))} kept before it; paired sampling error &plusmn;{v['paired_error']}"


def _ladders(cands: list[dict[str, Any]]) -> str:
    """The rungs ``quantize.int8_auto`` tried for each candidate that ran it: drop, size, p50, seconds, or the error,
    how each compared with the rung kept before it, and why the chosen one was kept when none met the budget."""
    e = html.escape
    out = []
    for c in cands:
        for s in c.get("steps", []):
            info = s.get("info") or {}
            if "ladder" not in info:
                continue
            rows = "".join(
                f"<tr><td>{e(r['rung'])}</td><td>{e(r['status'])}</td><td>{r.get('val_drop', '')}</td>"
                f"<td>{r.get('size_bytes', '')}</td><td>{r.get('latency_p50_ms', '')}</td><td>{r.get('seconds', '')}</td>"
                f"<td>{e(str(r.get('error') or r.get('float_layers') or ''))}</td><td>{_vs_kept(r)}</td></tr>"
                for r in info["ladder"]
            )
            met = "met" if info.get("budget_met") else "not met (closest kept)"
            why = f"<p>{e(info['warning'])}</p>" if info.get("warning") else ""
            out.append(
                f"<h3>{e(c['name'])}: chosen rung {e(str(info.get('chosen')))}, {e(info.get('drop_metric', ''))} "
                f"&le; {info.get('max_accuracy_drop')} on the validation split {met}</h3>{why}"
                "<table><tr><th>rung</th><th>status</th><th>val drop</th><th>size bytes</th><th>p50 ms</th><th>seconds</th>"
                f"<th>error / float layers</th><th>vs the kept rung</th></tr>{rows}</table>"
            )
    return "<h2>int8 ladders</h2>" + "".join(out) if out else ""


def render_html(results: dict[str, Any], png: bytes) -> str:
    e = html.escape
    best = results.get("best")
    cands = results["candidates"]
    b = next((c for c in cands if c["name"] == best), None)
    rows = "".join(_row(c, best, results) for c in cands)
    primary, drop, scale = task_of(results)
    cons = ", ".join(f"{c['metric']} {c['op']} {c['bound']:g}" for c in results.get("constraints", [])) or "none"
    search = results.get("search", {})
    best_html = "<p><b>No candidate meets the budget.</b> Closest: " + e(json.dumps(search.get("closest", []))) + "</p>"
    if b is not None:
        steps = "".join(
            f"<tr><td>{e(s['type'])}</td><td>{e(s.get('stage', ''))}</td><td>{s.get('params', '')}</td>"
            f"<td>{s.get('macs', '')}</td><td>{s.get('size_bytes', '')}</td><td>{s.get('size_gzip_bytes', '')}</td>"
            f"<td>{_ci(s, primary, scale)}</td></tr>"
            for s in b.get("steps", [])
        )
        best_html = (
            f"<h2>Chosen: {e(best or '')}</h2><pre>{e(yaml.safe_dump(b['recipe'], sort_keys=False))}</pre>"
            "<h3>Effect of each step</h3><table><tr><th>step</th><th>stage</th><th>params</th><th>MACs</th>"
            f"<th>size bytes</th><th>gzip bytes</th><th>{e(primary)}</th></tr>{steps}</table>"
        )
    cfg = search.get("config", {})
    cmd = ["keiryo optimize", f"--model {results['model']['source']}", "--weights DIR/baseline.safetensors"]
    cmd += [f"--model-opt {k}={v}" for k, v in results["model"].get("options", {}).items()]
    if results.get("task"):
        cmd += [f"--task {results['task'].get('name')}"]
    cmd += [f"--data {results['data']['source']}"] + [
        f"--data-opt {k}={v}" for k, v in results["data"].get("options", {}).items()
    ]
    flag = {
        drop: "--max-drop",
        "latency_p95_ms": "--max-latency-ms",
        "size_mb": "--max-size-mb",
        "fidelity": "--min-fidelity",
    }
    cmd += [f"{flag[c['metric']]} {c['bound']:g}" for c in results.get("constraints", []) if c["metric"] in flag]
    if cfg:
        cmd += [f"--target {cfg.get('target', 'onnx')}", f"--trials {cfg.get('trials')}", f"--seed {cfg.get('seed', 0)}"]
    cmd += ["--out DIR"]
    machine = results["machine"]
    browsers = sorted({json.dumps(i, sort_keys=True) for c in cands if (i := (c.get("metrics") or {}).get("runtime_info"))})
    where = "".join(
        f" In the browser: {e(i.get('browser', '?'))}, onnxruntime-web {e(str(i.get('onnxruntime_web', '?')))}, wasm SIMD "
        f"{'on' if i.get('simd') else 'off'}, {i.get('wasm_threads', 1)} thread(s)."
        for i in map(json.loads, browsers)
    )
    slower = [c["name"] for c in cands if c.get("status") == "ok" and c["metrics"].get("smaller_but_slower")]
    if slower:
        where += f" Smaller but slower than fp32 on this runtime: {e(', '.join(slower))}."
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>keiryo report</title><style>{_CSS}</style></head><body>
<h1>keiryo: {e(results["model"]["source"])} on {e(results["data"]["source"])}</h1>
<p class="note">Budget: {e(cons)}. Baseline (torch) {e(primary)} {_ci(results["baseline"]["metrics"], primary, scale)}
on {results["baseline"]["metrics"].get("samples", "?")} test samples (95% intervals in brackets).
Every figure was measured by running the exported file on its runtime ({e(machine["cpu"]["model"])},
int8 dot-product: {e(", ".join(machine["cpu"]["int8_isa"]) or "none")}, {machine.get("threads", 1)} thread(s)).{where}
{("Trials: " + str(search.get("trials_finished")) + ", failed: " + str(search.get("trials_failed")) + ", " + str(search.get("seconds")) + " s.") if search else ""}</p>
<img alt="Pareto plot: task metric against p95 latency" src="data:image/png;base64,{base64.b64encode(png).decode()}">
{best_html}
<h2>All candidates</h2><p class="note">Click a column to sort.</p>
<table class="sortable"><thead><tr><th>name</th><th>{e(primary)}</th><th>{e(drop)}</th><th>fidelity</th><th>size MB</th>
<th>gzip MB</th><th>p50 ms</th><th>p95 ms</th><th>MMACs</th><th>meets budget</th></tr></thead><tbody>{rows}</tbody></table>
{_ladders(cands)}
<h2>Reproduce</h2><pre>{e(" ".join(cmd))}</pre>
<h2>Machine and libraries</h2><pre>{e(json.dumps(machine, indent=2))}</pre>
<script>{_SORT_JS}</script></body></html>"""


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    png = pareto_png(results)
    (out / "pareto.png").write_bytes(png)
    p = out / "report.html"
    p.write_text(render_html(results, png), encoding="utf-8")
    return p
