"""Shared by the bench scripts: print the targets and whether each was met."""

from __future__ import annotations


def report(checks: list[tuple[str, bool, str]], artefacts: object) -> int:
    """Print ``[ok]`` / ``[MISSED]`` per target and where the artefacts are; the exit code says if all were met."""
    print()
    for what, ok, got in checks:
        print(f"[{'ok' if ok else 'MISSED'}] {what}: {got}")
    print(f"\nartefacts: {artefacts}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def interleaved(paths: dict[str, object], runtime: str, sample: dict, cfg: object, rounds: int) -> dict[str, dict[str, float]]:
    """Median p50 and p95 (ms) per candidate file, measured in fresh processes taking turns over ``rounds``,
    so drift on a noisy machine hits every candidate alike."""
    import statistics

    from keiryo.benchmark import measure_file

    p50: dict[str, list[float]] = {n: [] for n in paths}
    p95: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for n, path in paths.items():
            r = measure_file(path, runtime, sample, cfg)  # type: ignore[arg-type]
            p50[n].append(r.latency_p50_ms)
            p95[n].append(r.latency_p95_ms)
    return {n: {"p50": statistics.median(p50[n]), "p95": statistics.median(p95[n])} for n in paths}


def cpu_line(threads: int, extra: str = "") -> str:
    from keiryo.machine import cpu

    c = cpu()
    return f"{c['model']}, int8 dot-product: {', '.join(c['int8_isa']) or 'none'}; {threads} thread(s), batch 1{extra}"
