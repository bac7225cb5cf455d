"""Federated learning's tests run in their own environment: no Flower release installs beside the dev extras
(see the ``federated`` extra in pyproject.toml), so scripts/setup builds .venv-federated (keiryo[federated])
and this test runs tests/federated there; in the dev environment, ``keiryo federate`` names that environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_federated_suite_in_its_own_environment():
    if not FEDERATED_PYTHON.exists():
        pytest.fail(f"{FEDERATED_PYTHON} is missing: run scripts/setup (it builds .venv-federated for the federated tests)")
    env = {k: v for k, v in os.environ.items() if k not in ("KEIRYO_FAULT", "PYTEST_ADDOPTS", "VIRTUAL_ENV")}
    r = subprocess.run(
        [str(FEDERATED_PYTHON), "-m", "pytest", "tests/federated", "-q", "-p", "no:cacheprovider", "--timeout", "300"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    sys.stdout.write(r.stdout[-4000:])  # shown with -rA or on failure
    assert r.returncode == 0, f"tests/federated failed in .venv-federated:\n{r.stdout[-8000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and " skipped" not in r.stdout


def test_federate_without_flower_names_the_extra_and_the_environment(tmp_path, capsys):
    try:
        import flwr  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("Flower is installed here; this checks the environment without it")
    code, _, err = run_cli("federate", "--out", str(tmp_path / "fl"), capsys=capsys)
    line = one_line_error(err)
    assert code != 0 and "keiryo[federated]" in line and ".venv-federated" in line
