"""The privacy commands and options: ``keiryo train --dp`` options, ``keiryo federate``.

Registered from :mod:`keiryo.cli.main`; nothing here imports Opacus or Flower until a command runs.
"""

from __future__ import annotations

from typing import Any

from keiryo.errors import ConfigError


def dp_config(dp: bool, target_epsilon: float | None, delta: float | None, max_grad_norm: float, accountant: str) -> Any:
    """The ``--dp`` options as a :class:`~keiryo.privacy.dp.DPConfig` (None without ``--dp``)."""
    from keiryo.privacy.dp import DPConfig

    if not dp:
        given = [n for n, v in (("--target-epsilon", target_epsilon), ("--delta", delta)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --dp (differentially private training)")
        return None
    if target_epsilon is None:
        raise ConfigError("--dp needs --target-epsilon (the run's privacy budget, e.g. 8; smaller is more private)")
    return DPConfig.parse(
        {"target_epsilon": target_epsilon, "delta": delta, "max_grad_norm": max_grad_norm, "accountant": accountant},
        where="--dp options",
    )
