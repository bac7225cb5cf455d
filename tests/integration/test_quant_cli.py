"""int8 from the CLI: a budget no candidate meets, with --require-met; doctor --quant."""

from __future__ import annotations

import json

from keiryo.cli import main

TINY = ["--model", "keiryo.testing:tiny_cnn", "--data-opt", "size=8"]


def test_compress_require_met_lists_the_closest_and_exits_non_zero(tmp_path, capsys):
    args = ["compress", *TINY, "--recipe", "int8", "--recipe", "int8-mse", "--out", str(tmp_path / "o")]
    args += ["--constraint", "size_bytes<=10", "--iterations", "5", "--require-met"]
    code = main(args)
    err = capsys.readouterr().err
    assert code not in (0, None)
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")][-1]
    assert "no candidate meets the budget" in line and "closest: " in line and "int8" in line
    results = json.loads((tmp_path / "o" / "results.json").read_text())  # the run is kept, not lost
    assert results["best"] is None and {c["name"] for c in results["candidates"]} >= {"int8", "int8-mse"}


def test_doctor_quant_prints_the_sensitivity_table(capsys):
    assert main(["doctor", *TINY, "--data", "digits", "--quant"]) in (0, None)
    out = capsys.readouterr().out
    assert "int8 sensitivity" in out and "fix: " in out
