"""The privacy commands and options: ``keiryo train --dp`` options, ``keiryo federate``.

Registered from :mod:`keiryo.cli.main`; nothing here imports Opacus or Flower until a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from keiryo.errors import ConfigError

privacy_app = typer.Typer(help="Privacy tools: keys for encrypted packages.", no_args_is_help=True)


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


def print_guarantees(console: Any, pkg_or_manifest: Any) -> None:
    """The privacy lines of a package: its DP guarantee and for whom its model is encrypted."""
    from keiryo.privacy.dp import summary_line

    m = pkg_or_manifest
    if isinstance(m, Path):
        from keiryo.packages import read_manifest

        m = read_manifest(m)
    rec = m.get("privacy")
    if rec:
        console.print(f"privacy: {summary_line(rec)}", highlight=False)
    enc = m.get("encryption")
    if enc:
        console.print(f"encrypted: {enc['cipher']} ({enc['key_wrap']}) for key {enc['recipient']}", highlight=False)


@privacy_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="the device's private key (X25519 PEM) or the symmetric key file")],
    kind: Annotated[str, typer.Option("--kind", help="x25519 (a key pair: NAME.pub.pem to --encrypt-to) | symmetric")] = "x25519",
    overwrite: Annotated[bool, typer.Option(help="replace existing key files")] = False,
) -> None:
    """Create a key for encrypted packages: a device key pair (X25519), or a 32-byte symmetric key."""
    from keiryo.privacy.encryption import read_key, write_symmetric_key, write_x25519_pair

    if kind not in ("x25519", "symmetric"):
        raise ConfigError(f"--kind {kind!r}: expected x25519 or symmetric")
    k: Literal["x25519", "symmetric"] = kind  # type: ignore[assignment]
    from keiryo.cli.main import _console

    if k == "symmetric":
        p = write_symmetric_key(out, overwrite=overwrite)
        _console().print(f"symmetric key: {p} (mode 600), fingerprint {read_key(p).fingerprint}", highlight=False)
        return
    priv, pub = write_x25519_pair(out, overwrite=overwrite)
    _console().print(
        f"private key: {priv} (mode 600, stays on the device)\npublic key:  {pub} (give it to --encrypt-to), "
        f"fingerprint {read_key(pub).fingerprint}",
        highlight=False,
    )
