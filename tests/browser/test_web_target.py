"""``--target web``: candidates measured inside headless Chromium with onnxruntime-web, like any runtime."""

from __future__ import annotations

import json

import pytest

from keiryo.cli.main import main
from keiryo.runtime.web import unavailable

browser = pytest.mark.skipif(unavailable() is not None, reason=f"browser tests: {unavailable()}")


@browser
def test_compress_target_web_measures_in_the_browser_and_records_it(tmp_path, tiny_weights, capsys):
    out = tmp_path / "out"
    tiny = ["--model", "keiryo.testing:tiny_cnn", "--model-opt", "width=8", "--weights", str(tiny_weights)]
    args = ["--target", "web", "-r", "int8", "-r", "int8-dynamic", "--iterations", "30", "--out", str(out)]
    code = main(["compress", *tiny, *args])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "onnxruntime-web" in printed and "SIMD on" in printed  # the table says where it was measured
    res = json.loads((out / "results.json").read_text())
    by = {c["name"]: c for c in res["candidates"]}
    assert set(by) == {"fp32", "int8", "int8-dynamic"}
    for c in by.values():
        m = c["metrics"]
        assert c["runtime"] == "web" and c["format"] == "onnx" and c["recipe"]["target"] == "web"
        info = m["runtime_info"]
        assert info["simd"] is True and info["browser"].startswith("chromium ") and info["onnxruntime_web"]
        assert m["latency_p50_ms"] > 0 and m["latency_p95_ms"] >= m["latency_p50_ms"] and m["peak_rss_mb"] is None
        # the trap is named either way: smaller and slower is flagged, smaller and faster is not
        assert m["smaller_but_slower"] == (m["size_ratio_vs_fp32"] > 1.05 and m["speedup_p50_vs_fp32"] < 0.95)
    assert by["int8"]["metrics"]["size_ratio_vs_fp32"] > 1.1
    assert by["int8"]["metrics"]["fidelity"] >= 0.95
    from keiryo.report.html import render_html

    html = render_html(res, b"")  # the report says where the figures come from, and names the slower ones
    assert f"In the browser: {by['fp32']['metrics']['runtime_info']['browser']}, onnxruntime-web" in html
    slower = [n for n, c in by.items() if c["metrics"]["smaller_but_slower"]]
    assert ("Smaller but slower than fp32 on this runtime" in html) == bool(slower)


def test_the_search_offers_the_onnx_templates_for_the_web_target():
    from keiryo.search.space import TEMPLATES, templates_for

    assert templates_for("web") == templates_for("onnx") == list(TEMPLATES)  # web writes ONNX files
    assert "ptq_fallback" not in templates_for("tflite")
