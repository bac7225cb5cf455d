"""``keiryo registry ...``: a registry of signed packages with TUF metadata (see docs/updates.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from keiryo.errors import ConfigError

registry_app = typer.Typer(
    help="A registry of signed packages: immutable versions, signed expiring aliases (TUF metadata), a log.",
    no_args_is_help=True,
)
RegistryOpt = Annotated[
    Optional[Path], typer.Option("--registry", help="registry root (default $KEIRYO_REGISTRY or ~/.keiryo/registry)")
]
KeysOpt = Annotated[
    Optional[Path], typer.Option("--keys", help="the registry's TUF role keys (default $KEIRYO_REGISTRY_KEYS or REGISTRY.keys)")
]
ByOpt = Annotated[Optional[str], typer.Option("--by", help="who is doing this (default: the OS user)")]


def _console() -> Any:
    from keiryo.cli.main import _console

    return _console()


def _store(root: Path | None, keys: Path | None = None) -> Any:
    from keiryo.packages.store import PackageStore

    return PackageStore(root, keys)


@registry_app.command("init")
def registry_init(
    registry: RegistryOpt = None,
    keys: KeysOpt = None,
    root_keys: Annotated[int, typer.Option("--root-keys", min=1, max=16, help="how many root keys to create")] = 1,
    root_threshold: Annotated[int, typer.Option("--root-threshold", min=1, help="root signatures a change of root needs")] = 1,
) -> None:
    """Create the registry's TUF metadata and role keys (a first push does this with one root key)."""
    store = _store(registry, keys)
    root = store.init(root_keys=root_keys, root_threshold=root_threshold)
    _console().print(
        f"initialised {store.root}: keys in {store.trust.keys} (keep them off the registry's host); "
        f"give devices and servers {root} as their trusted root",
        highlight=False,
    )


@registry_app.command("push")
def registry_push(
    pkg: Annotated[Path, typer.Argument(help="package directory from `keiryo package`")],
    public_key: Annotated[Path, typer.Option("--public-key", help="the signer's public key: unsigned or tampered = refused")],
    registry: RegistryOpt = None,
    keys: KeysOpt = None,
    by: ByOpt = None,
) -> None:
    """Verify a package and publish it as an immutable version (signed into the TUF targets metadata)."""
    store = _store(registry, keys)
    fresh = not store.trust.exists()
    name, version = store.push(pkg, public_key, by=by)
    _console().print(f"pushed {name} {version} to {store.root}", highlight=False)
    if fresh:
        _console().print(f"initialised TUF metadata; role keys in {store.trust.keys}", highlight=False)


@registry_app.command("list")
def registry_list(registry: RegistryOpt = None) -> None:
    """Packages, their versions (oldest first) and aliases."""
    from rich.table import Table

    store = _store(registry)
    t = Table("package", "versions", "aliases", title=str(store.root))
    for name in store.names():
        t.add_row(name, ", ".join(store.versions(name)), ", ".join(f"{a} -> {v}" for a, v in store.aliases(name).items()))
    _console().print(t)


@registry_app.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME@VERSION")], registry: RegistryOpt = None
) -> None:
    """A version's manifest summary (JSON)."""
    info = _store(registry).show(ref)
    m = info["manifest"]
    summary = {k: info[k] for k in ("name", "version", "serial", "aliases", "path")}
    summary.update({k: m.get(k) for k in ("format", "runtime", "inputs", "outputs", "labels")})
    summary["metrics"] = {k: m.get("metrics", {}).get(k) for k in ("accuracy", "size_bytes", "latency_p50_ms")}
    summary["recipe"] = m.get("recipe", {}).get("name")
    typer.echo(json.dumps(summary, indent=2))


@registry_app.command("promote")
def registry_promote(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION to promote")],
    alias: Annotated[str, typer.Option("--alias", "-a", help="alias to move, e.g. production, staging")],
    registry: RegistryOpt = None,
    keys: KeysOpt = None,
    by: ByOpt = None,
    downgrade: Annotated[
        bool, typer.Option("--downgrade", help="allow moving the alias to an older version (signed as a rollback)")
    ] = False,
) -> None:
    """Point an alias at a version (logged, then signed: when, from, to, by whom)."""
    name, _, version = ref.partition("@")
    if not version:
        raise ConfigError(f"{ref}: give NAME@VERSION")
    before = _store(registry, keys).promote(name, version, alias, by=by, downgrade=downgrade)
    _console().print(f"{name}@{alias}: {before or '(none)'} -> {version}", highlight=False)


@registry_app.command("rollback")
def registry_rollback(
    name: Annotated[str, typer.Argument(help="package name")],
    alias: Annotated[str, typer.Option("--alias", "-a", help="alias to move back")] = "production",
    registry: RegistryOpt = None,
    keys: KeysOpt = None,
    by: ByOpt = None,
) -> None:
    """Move an alias back to the version it pointed at before (a signed rollback devices accept)."""
    cur, to = _store(registry, keys).rollback(name, alias, by=by)
    _console().print(f"{name}@{alias}: {cur} -> {to} (rolled back)", highlight=False)


@registry_app.command("log")
def registry_log(name: Annotated[str, typer.Argument(help="package name")], registry: RegistryOpt = None) -> None:
    """The write-ahead log of pushes, promotions and rollbacks (JSON lines; "committed" says whether each took effect)."""
    for e in _store(registry).log(name):
        typer.echo(json.dumps(e))


@registry_app.command("refresh")
def registry_refresh(registry: RegistryOpt = None, keys: KeysOpt = None) -> None:
    """Re-sign the timestamp (and what nears expiry). Run it daily: unrefreshed metadata expires on purpose."""
    out = _store(registry, keys).refresh()
    _console().print(f"timestamp valid until {out['timestamp']}", highlight=False)


@registry_app.command("rotate-key")
def registry_rotate_key(
    role: Annotated[str, typer.Argument(help="root | targets | snapshot | timestamp")],
    registry: RegistryOpt = None,
    keys: KeysOpt = None,
) -> None:
    """Replace a role's keys: a new root version, signed by the old root keys (and the new ones, for root)."""
    store = _store(registry, keys)
    with store._lock():  # noqa: SLF001 - the store's lock guards every metadata write
        new = store.trust.rotate(role)
    names = ", ".join(str(f) for f in new)
    _console().print(f"rotated the {role} key(s): {names}; the old ones are kept aside as *.revoked-*.pem", highlight=False)


@registry_app.command("serve")
def registry_serve(
    registry: RegistryOpt = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8100,
) -> None:
    """Serve the registry's metadata and packages over HTTP (read only, Range requests) for agents and servers."""
    from keiryo.packages.http import serve_registry
    from keiryo.packages.store import default_root

    root = registry or default_root()
    _console().print(f"serving {root} on http://{host}:{port}/ (read only)", highlight=False)
    serve_registry(root, host, port)
