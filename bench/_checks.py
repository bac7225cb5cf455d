"""Shared by the bench scripts: print the targets and whether each was met."""

from __future__ import annotations


def report(checks: list[tuple[str, bool, str]], artefacts: object) -> int:
    """Print ``[ok]`` / ``[MISSED]`` per target and where the artefacts are; the exit code says if all were met."""
    print()
    for what, ok, got in checks:
        print(f"[{'ok' if ok else 'MISSED'}] {what}: {got}")
    print(f"\nartefacts: {artefacts}")
    return 0 if all(ok for _, ok, _ in checks) else 1
