"""The page's default: the demo's digits model in a registry of its own, made from ``keiryo demo``'s results.

``ensure_demo_registry(out)`` runs the demo when ``out/results.json`` is missing (about 3 minutes on 2 cores),
then signs the fp32 and int8 candidates as ``digits`` 1.0.0 and 2.0.0 with a key made in ``out/app/``, pushes
both to the registry ``out/app/registry`` and points ``staging`` at 1.0.0 (fp32) and ``production`` at 2.0.0
(int8). An existing registry is reused as it is.
"""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "digits"


def ensure_demo_registry(out: str | Path, *, progress: bool = True) -> tuple[Path, Path]:
    """(registry root, public key) of the demo registry under ``out``, made if needed."""
    from keiryo.packages import keygen, package
    from keiryo.packages.store import PackageStore

    out = Path(out)
    home = out / "app"
    root, pub = home / "registry", home / "signing.pub.pem"
    store = PackageStore(root)
    if (root / "tuf" / "1.root.json").is_file() and pub.is_file():
        return root, pub
    if not (out / "results.json").is_file():
        from keiryo.demo import run_demo

        run_demo(out, progress=progress)
    home.mkdir(parents=True, exist_ok=True)
    priv, pub = keygen(home / "signing.pem", pub, overwrite=True)
    store.init()
    for version, candidate, alias in (("1.0.0", "fp32", "staging"), ("2.0.0", "int8", "production")):
        dst = home / f"{DEMO_NAME}-{version}"
        pkg = package(out, name=DEMO_NAME, version=version, private_key=priv, out=dst, candidate=candidate, overwrite=True)
        store.push(pkg, pub)
        store.promote(DEMO_NAME, version, alias)
    return root, pub
