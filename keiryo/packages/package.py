"""Model packages: a candidate from ``results.json`` as a signed, self-describing directory (and ``.tar.gz``).

::

    PKG/
      model.onnx | model.tflite | model.mlpackage/
      keiryo.json      the manifest: name, version, format, inputs/outputs (OIP datatypes, -1 = any batch),
                       labels, preprocessing, metrics, recipe, versions, golden input/output vectors,
                       drift reference (input statistics and predicted classes on the test split)
      model.sig        OpenSSF model-signing bundle over every other file

The package is built in a temporary sibling and renamed into place only once signed, so a
failure never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from keiryo._atomic import atomic_dir, recover_dir, remove_stale
from keiryo._faults import fault_point
from keiryo.errors import ConfigError, InputFileError, IntegrityError
from keiryo.packages.signing import SIGNATURE, sign_dir, verify_dir

MANIFEST = "keiryo.json"
MANIFEST_SCHEMA_VERSION = 2  # 2: inputs/outputs from the model's IOSpec (any names and datatypes), task, named golden vectors
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.+-]{0,62}$")
MODEL_FILE_RE = re.compile(r"^model\.(onnx|tflite|mlpackage)$")
GOLDEN_ROWS = 4
GOLDEN_ATOL = 1e-4


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"{what} {name!r}: expected lowercase letters, digits, '.', '_' or '-' (at most 63), no path")
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.match(version) or ".." in version:
        raise ConfigError(f"version {version!r}: expected letters, digits, '.', '_', '+' or '-' (at most 63), no path")
    return version


def _candidate(results: dict[str, Any], name: str | None, where: Path) -> dict[str, Any]:
    cands = {c["name"]: c for c in results.get("candidates", []) if c.get("status", "ok") == "ok"}
    pick = name or results.get("best")
    if pick is None:
        raise ConfigError(f"{where}: no best candidate recorded; pass --candidate (one of: {', '.join(cands)})")
    if pick not in cands:
        raise ConfigError(f"{where}: no candidate {pick!r}; expected one of: {', '.join(cands)}")
    return cands[pick]


def golden_inputs(inputs: list[dict[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded valid inputs for every named input of a manifest: floats in [0, 1), integers and bools in {0, 1}
    (a token id of 0 or 1 and a mask of 0 or 1 are valid for any text model)."""
    from keiryo.serve.protocol import DATATYPES

    rng = np.random.default_rng(seed)
    out = {}
    for t in inputs:
        dtype = DATATYPES[t["datatype"]]
        shape = (GOLDEN_ROWS, *[d if d > 0 else 8 for d in t["shape"][1:]])
        if dtype.kind == "f":
            out[t["name"]] = rng.uniform(0, 1, size=shape).astype(dtype)
        else:
            out[t["name"]] = rng.integers(0, 2, size=shape).astype(dtype)
    return out


def golden_vectors(model_file: Path, runtime: str, inputs: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Seeded inputs and the outputs the shipped file gives on its runtime: a server or device must reproduce them."""
    from keiryo.runtime import open_session

    x = golden_inputs(inputs, seed)
    with open_session(runtime, model_file, 1) as s:
        ys = s.run(x)
        names = list(s.output_names)
    return {
        "inputs": {k: v.tolist() for k, v in x.items()},
        "outputs": {n: np.asarray(y).tolist() for n, y in zip(names, ys, strict=True)},
        "atol": GOLDEN_ATOL,
        "seed": seed,
    }


def check_golden(model_file: Path, runtime: str, golden: dict[str, Any], session: Any = None, inputs: Any = None) -> float:
    """Max abs difference between the golden outputs and what ``model_file`` gives now; raises past ``atol``.

    ``inputs``: the manifest's input descriptions (datatypes); golden vectors of manifest schema 1
    (one unnamed float input and output) are read too.
    """
    from keiryo.runtime import open_session
    from keiryo.serve.protocol import DATATYPES

    def check(s: Any) -> float:
        if isinstance(golden["inputs"], dict):
            types = {t["name"]: DATATYPES[t["datatype"]] for t in inputs or []}
            x = {k: np.asarray(v, dtype=types.get(k, np.float32)) for k, v in golden["inputs"].items()}
            want = [np.asarray(v) for v in golden["outputs"].values()]
        else:
            x = {s.input_names[0]: np.asarray(golden["inputs"], dtype=np.float32)}
            want = [np.asarray(golden["outputs"], dtype=np.float32)]
        got = s.run(x)
        if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
            return float("inf")
        return max((float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0) for g, w in zip(got, want, strict=True))

    if session is None:
        with open_session(runtime, model_file, 1) as s:
            diff = check(s)
    else:
        diff = check(session)
    if not diff <= golden["atol"]:
        raise IntegrityError(f"{model_file}: golden vectors do not reproduce (max abs diff {diff:.3g} > {golden['atol']:g})")
    return diff


def build_manifest(results: dict[str, Any], cand: dict[str, Any], name: str, version: str, model_file: str) -> dict[str, Any]:
    from keiryo import __version__
    from keiryo.machine import library_versions
    from keiryo.model.io import IOSpec

    data = results.get("data", {})
    io = IOSpec.parse(results.get("model", {}).get("io"), where="results.json model.io")

    def oip(t: Any) -> dict[str, Any]:
        return {"name": t.name, "datatype": t.oip_datatype, "shape": [d if isinstance(d, int) else -1 for d in t.shape]}

    metrics = dict(cand.get("metrics", {}))
    drift = metrics.pop("drift_reference", None)  # keiryo.drift: what a server compares its traffic with
    head = io.outputs[0].shape[-1] if io.outputs and len(io.outputs[0].shape) == 2 else None
    labels = data.get("class_names") or ([str(i) for i in range(head)] if isinstance(head, int) else [])
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": name,
        "version": version,
        "format": cand["format"],
        "runtime": cand.get("runtime"),
        "model_file": model_file,
        "inputs": [oip(t) for t in io.inputs],
        "outputs": [oip(t) for t in io.outputs],
        "task": results.get("task", {}),
        "labels": labels,
        "preprocessing": data.get("preprocessing", {}),
        "metrics": metrics,
        "recipe": cand.get("recipe", {}),
        "source_model": results.get("model", {}),
        "keiryo_version": __version__,
        "library_versions": library_versions(),
        "machine": results.get("machine", {}),
        **_privacy(results, cand),
        **({"drift_reference": drift} if drift else {}),
    }


def _privacy(results: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    """The DP guarantee behind the candidate (keiryo.privacy.dp), as the manifest's ``privacy`` block, if any."""
    from keiryo.privacy.dp import privacy_of

    rec = privacy_of(results, cand)
    return {"privacy": rec} if rec else {}


def package(
    result_dir: str | Path,
    *,
    name: str,
    version: str,
    private_key: str | Path,
    out: str | Path,
    candidate: str | None = None,
    overwrite: bool = False,
    encrypt_to: str | Path | None = None,
) -> Path:
    """Package a candidate of ``result_dir`` (``results.json``) into ``out`` (and ``out.tar.gz``), signed.

    ``encrypt_to``: a recipient's public key or a symmetric key file: the model file is encrypted
    (keiryo.privacy.encryption, after the golden vectors are taken) and then signed with the rest."""
    from keiryo.report.results import read_results

    check_name(name)
    check_version(version)
    src = Path(result_dir)
    results = read_results(src)
    cand = _candidate(results, candidate, src)
    artifact = src / cand["artifact"]
    if not artifact.exists():
        raise InputFileError(f"{artifact}: the candidate's model file is missing")
    dst = Path(out)
    tgz = dst.with_name(dst.name + ".tar.gz")
    recover_dir(dst)  # an --overwrite killed mid-swap left the old package aside: put it back first
    if (dst.exists() or tgz.exists()) and not overwrite:
        raise ConfigError(f"{dst}: exists; pass --overwrite or choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst.parent, f".{dst.name}")
    with atomic_dir(dst, replace=overwrite) as pkg:
        model_file = f"model{artifact.suffix}"
        if artifact.is_dir():
            shutil.copytree(artifact, pkg / model_file)
        else:
            shutil.copy2(artifact, pkg / model_file)
        manifest = build_manifest(results, cand, name, version, model_file)
        runtime = manifest["runtime"]
        if runtime != "coreml":
            manifest["golden"] = golden_vectors(pkg / model_file, runtime, manifest["inputs"])
        if encrypt_to is not None:
            from keiryo.privacy.encryption import encrypt_file, read_key

            aad = f"keiryo:{name}:{version}:{model_file}"
            manifest["encryption"] = encrypt_file(pkg / model_file, read_key(encrypt_to), aad)
        (pkg / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        sign_dir(pkg, private_key)
        fault_point("package.signed")
        # the archive is written aside and replaced whole, then the directory is swapped in; a kill
        # in between leaves the new archive beside the old, still complete, directory
        fd, tmp_tgz = tempfile.mkstemp(prefix=f".{tgz.name}.", suffix=".partial", dir=dst.parent)
        os.close(fd)
        try:
            with tarfile.open(tmp_tgz, "w:gz") as tar:
                tar.add(pkg, arcname=dst.name)
            with open(tmp_tgz, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_tgz, tgz)
        except BaseException:
            Path(tmp_tgz).unlink(missing_ok=True)
            raise
    return dst


def read_manifest(pkg: str | Path) -> dict[str, Any]:
    p = Path(pkg) / MANIFEST
    try:
        data = p.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as e:
        raise InputFileError(f"{pkg}: not a keiryo package (no {MANIFEST})") from e
    return parse_manifest(data, p)


def parse_manifest(data: bytes, where: str | Path) -> dict[str, Any]:
    """The manifest in ``data`` (the bytes of ``keiryo.json``), checked: schema, name, version, model file."""
    try:
        m = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise InputFileError(
            f"{where}: unsupported manifest (schema_version {m.get('schema_version') if isinstance(m, dict) else '?'})"
        )
    try:
        check_name(str(m.get("name")), "package name")
        check_version(str(m.get("version")))
    except ConfigError as e:
        raise IntegrityError(f"{where}: {e}") from e
    model_file = m.get("model_file")
    if not isinstance(model_file, str) or not MODEL_FILE_RE.match(model_file):
        raise IntegrityError(f"{where}: model_file {model_file!r}: expected a plain file name inside the package (model.EXT)")
    return m


def check_identity(manifest: dict[str, Any], name: str, version: str, where: str | Path) -> None:
    """A package is only ever what its signed manifest says: refuse it under any other name or version."""
    if (manifest["name"], manifest["version"]) != (name, version):
        raise IntegrityError(
            f"{where}: the signed manifest is {manifest['name']} {manifest['version']}, "
            f"but it is published as {name} {version}; a package is bound to its name and version"
        )


def verify(
    pkg: str | Path, public_key: str | Path, *, golden: bool = True, decryption_key: str | Path | None = None
) -> dict[str, Any]:
    """Verify every file against the signature, then (``golden``) that the golden vectors reproduce.

    An encrypted model is decrypted in memory for the golden check with ``decryption_key`` (a file, else
    ``$KEIRYO_DECRYPTION_KEY``); without one it is refused unless ``golden`` is off (``encrypted_for`` names the key).
    Returns ``{manifest, files, golden_max_abs_diff, encrypted_for}``.
    """
    p = Path(pkg)
    recover_dir(p)  # an --overwrite killed mid-swap left the old package aside: it is put back
    if p.suffixes[-2:] == [".tar", ".gz"] or not p.is_dir():
        raise InputFileError(f"{p}: expected a package directory (unpack a .tar.gz first)")
    files = verify_dir(p, public_key)
    manifest = read_manifest(p)
    model_file = p / manifest["model_file"]
    if model_file.is_symlink() or not (model_file.is_file() or manifest["format"] == "coreml"):
        raise IntegrityError(f"{model_file}: expected a plain file inside the package")
    diff = None
    enc = manifest.get("encryption")
    if golden and "golden" in manifest and enc is None:
        diff = check_golden(model_file, manifest["runtime"], manifest["golden"], inputs=manifest["inputs"])
    elif golden and "golden" in manifest:
        from keiryo.privacy import encryption
        from keiryo.runtime import open_session

        # in memory only; no key (or the wrong one) is refused naming the key the package expects
        plain = encryption.decrypt_model(model_file.read_bytes(), dict(enc or {}), encryption.decryption_key(decryption_key))
        with open_session(manifest["runtime"], plain, 1) as s:
            diff = check_golden(model_file, manifest["runtime"], manifest["golden"], session=s, inputs=manifest["inputs"])
    return {
        "manifest": manifest,
        "files": sorted(f for f in files if f != SIGNATURE),
        "golden_max_abs_diff": diff,
        "encrypted_for": enc.get("recipient") if enc else None,
    }
