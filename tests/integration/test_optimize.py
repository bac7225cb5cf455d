"""keiryo optimize end to end on the tiny model: contract, report, resume after kill -9, budgets, failures, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keiryo.cli import main

KEIRYO = str(Path(sys.executable).parent / "keiryo")


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory, digits):
    from conftest import classification

    from keiryo.model import load_model, save_weights
    from keiryo.train import TrainConfig, train

    h = load_model("keiryo.testing:tiny_cnn", digits, options={"width": 16}, output_name="logits")
    train(h, digits, classification(h), TrainConfig(epochs=15, lr=1e-2), progress=False)
    return save_weights(h.module, tmp_path_factory.mktemp("w") / "tiny16.safetensors")


def base_args(w: Path) -> list[str]:
    return [
        "optimize",
        "--model",
        "keiryo.testing:tiny_cnn",
        "--model-opt",
        "width=16",
        "--weights",
        str(w),
        "--iterations",
        "10",
    ]


@pytest.fixture(scope="module")
def searched(tiny16, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "s"
    code = main(
        [
            *base_args(tiny16),
            "--out",
            str(out),
            "--trials",
            "4",
            "--template",
            "ptq",
            "--template",
            "ptq_fallback",
            "--template",
            "prune_distill",
            "--max-accuracy-drop",
            "2",
        ]
    )
    assert code == 0
    return out


def test_search_results_report_and_best(searched):
    res = json.loads((searched / "results.json").read_text())
    trials = [c for c in res["candidates"] if c["name"] != "fp32"]
    assert len(trials) == 4 and res["search"]["trials_finished"] == 4
    # every trial sampled is recorded, a file byte-identical to one already measured included (it is not counted)
    records = sorted((json.loads(p.read_text()) for p in searched.glob("trials/[0-9]*/candidate.json")), key=lambda r: r["trial"])
    dupes = [r for r in records if r.get("duplicate_of")]
    assert len(records) == len(trials) + len(dupes)
    assert res["search"]["duplicates"] == [{"trial": r["trial"], "of": r["duplicate_of"]} for r in dupes]
    # cheap first: both PTQ seeds, then fallback, then prune + distill
    assert [r["name"].split("-", 1)[1] for r in records[:4]] == ["ptq", "ptq", "ptq_fallback", "prune_distill"]
    # the PTQ trials (no torch-level step) export the model once: the first exports, the later ones reuse its file
    exports = [next(s for s in r["steps"] if s["type"] == "export.onnx") for r in records[:3]]
    assert not exports[0].get("cached") and all(e.get("cached") for e in exports[1:])
    measured = {c["name"]: c["sha256"] for c in res["candidates"] if c["status"] == "ok"}
    assert len(set(measured.values())) == len(measured)  # no file is measured twice
    for r in dupes:
        assert r["sha256"] == measured[r["duplicate_of"]] and r["trial"] not in {c["trial"] for c in trials}
        assert not list((searched / "trials" / f"{r['trial']:04d}").glob("model.*"))
    for c in trials:
        assert c["status"] == "ok" and (searched / c["artifact"]).is_file()
        assert {"accuracy", "fidelity", "latency_p50_ms", "latency_p95_ms", "size_bytes"} <= set(c["metrics"])
    assert res["constraints"] == [{"metric": "accuracy_drop", "op": "<=", "bound": 2.0}]
    assert res["search"]["pareto_front"] and res["best"] is not None
    assert res["schema_version"] == 2 and res["task"]["primary"] == "accuracy" and res["failed"] == 0
    ok_names = {c["name"] for c in res["candidates"] if c["status"] == "ok"}
    assert set(res["search"]["pareto_front"]) <= ok_names and res["best"] in ok_names
    for c in trials:
        assert {"accuracy_ci95", "accuracy_drop", "samples"} <= set(c["metrics"])
    assert (searched / res["best_artifact"]).is_file() and (searched / "best" / "recipe.yaml").is_file()
    html = (searched / "report.html").read_text()
    assert "data:image/png;base64," in html and "sortable" in html and "keiryo optimize" in html
    # the Reproduce command rebuilds the same model and task from the search folder
    assert "--weights DIR/baseline.safetensors" in html and "--task classification" in html and "--max-drop 2" in html
    assert (searched / "baseline.safetensors").is_file()
    assert "http://" not in html and "https://" not in html  # opens offline
    assert (searched / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    pd = next(c for c in trials if c["name"].endswith("prune_distill"))
    assert [s["type"] for s in pd["steps"]] == ["prune.structured", "distill", "export.onnx", "quantize.int8_static"]


def test_resume_after_kill_9_recomputes_no_completed_trial(tiny16, tmp_path):
    out = tmp_path / "s"
    args = [KEIRYO, *base_args(tiny16), "--out", str(out), "--template", "ptq", "--template", "cluster", "--template", "lowrank"]
    proc = subprocess.Popen(
        [*args, "--trials", "6"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("trials/[0-9]*/candidate.json"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob("trials/[0-9]*/candidate.json")}
    assert len(before) >= 2 and not (out / "results.json").exists()
    counted = sum(1 for _, text in before.values() if not json.loads(text).get("duplicate_of"))  # duplicates do not count
    done = subprocess.run([*args, "--trials", "6", "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {counted} finished trial(s) kept" in done.stderr
    after = {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob("trials/[0-9]*/candidate.json")}
    for name, stamp in before.items():
        assert after[name] == stamp, f"trial {name} was recomputed"
    ok = [c for c in json.loads((out / "results.json").read_text())["candidates"] if c.get("trial") is not None]
    assert len({c["trial"] for c in ok}) >= 6


@pytest.mark.slow
def test_resume_after_a_power_cut_at_a_trial_write_finds_no_stray_folder(tiny16, tmp_path):
    """Killed with unsynced writes discarded as its first trial folder is swapped into place: the
    leftover temporary folder never breaks --resume, which finishes and leaves none behind."""
    out = tmp_path / "s"
    args = [KEIRYO, *base_args(tiny16), "--out", str(out), "--template", "ptq", "--trials", "3"]
    env = {**os.environ, "KEIRYO_FAULT": "atomic_dir.before_swap@2:powerloss"}  # 1: the fp32 reference
    killed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["candidates"]
    assert not [p for p in out.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


def test_infeasible_budget_lists_closest_and_require_met_fails(tiny16, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(
        [
            *base_args(tiny16),
            "--out",
            str(out),
            "--trials",
            "2",
            "--template",
            "ptq",
            "--max-latency-ms",
            "0.000001",
            "--require-met",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert "no candidate meets the budget" in err and "closest:" in err
    res = json.loads((out / "results.json").read_text())
    assert res["best"] is None and res["search"]["closest"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--constraint", "speed<=1"], "unknown metric 'speed'"),
        (["--constraint", "accuracy>=0.99", "--constraint", "accuracy<=0.5"], "contradictory budget"),
        (["--max-latency-ms", "-2"], "bound must be >= 0"),
        (["--constraint", "latency_p95_ms=3"], "expected METRIC<=BOUND"),
        (["--template", "quantum"], "unknown search templates"),
    ],
)
def test_bad_budgets_fail_before_any_work(extra, expected, tiny16, tmp_path, capsys):
    out = tmp_path / "s"
    code = main([*base_args(tiny16), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code != 0 and expected in err
    assert not out.exists()


def test_a_crashing_trial_is_recorded_and_the_search_goes_on(tiny16, tmp_path):
    out = tmp_path / "s"
    # slim needs a zoo model: on tiny_cnn every slim trial fails with a clear reason
    code = main([*base_args(tiny16), "--out", str(out), "--trials", "3", "--template", "slim", "--template", "ptq"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    failed = [c for c in res["candidates"] if c.get("status") == "failed"]
    ok = [c for c in res["candidates"] if c.get("status") == "ok" and c["name"] != "fp32"]
    assert failed and ok
    assert "not a zoo model" in failed[0]["error"]
    assert res["search"]["trials_failed"] == len(failed)


@pytest.mark.slow
def test_ray_executor_on_a_local_ray_instance(tiny16, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        out = tmp_path / "s"
        code = main(
            [*base_args(tiny16), "--out", str(out), "--trials", "3", "--template", "ptq", "--executor", "ray", "--workers", "2"]
        )
        assert code == 0
        res = json.loads((out / "results.json").read_text())
        assert len([c for c in res["candidates"] if c.get("status") == "ok"]) == 4  # fp32 + 3 trials
    finally:
        ray.shutdown()
