"""Signed packages: keygen, package, verify (real model-signing, offline EC keys)."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest
from test_cli import one_line_error, run_cli

from keiryo.errors import ConfigError, IntegrityError
from keiryo.packages import keygen, package, read_manifest, verify


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return keygen(d / "key.pem")


@pytest.fixture(scope="module")
def pkg(tiny_results, keys, tmp_path_factory):
    out, results = tiny_results
    return package(out, name="tiny", version="1.0.0", private_key=keys[0], out=tmp_path_factory.mktemp("pkg") / "tiny-1.0.0")


def _copy(pkg, tmp_path):
    dst = tmp_path / pkg.name
    shutil.copytree(pkg, dst)
    return dst


def test_package_layout_manifest_and_tarball(pkg, tiny_results, keys):
    _, results = tiny_results
    assert sorted(p.name for p in pkg.iterdir()) == ["keiryo.json", "model.onnx", "model.sig"]
    m = read_manifest(pkg)
    best = next(c for c in results["candidates"] if c["name"] == results["best"])
    assert (m["name"], m["version"], m["format"], m["runtime"]) == ("tiny", "1.0.0", "onnx", "onnxruntime")
    assert m["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert m["labels"] == [str(i) for i in range(10)] and m["preprocessing"]
    assert m["metrics"]["accuracy"] == best["metrics"]["accuracy"] and m["recipe"] == best["recipe"]
    assert "onnxruntime" in m["library_versions"] and m["keiryo_version"]
    assert list(m["golden"]["inputs"]) == ["image"] and list(m["golden"]["outputs"]) == ["logits"]
    assert len(m["golden"]["inputs"]["image"]) == len(m["golden"]["outputs"]["logits"]) == 4
    with tarfile.open(pkg.with_name(pkg.name + ".tar.gz")) as t:
        assert sorted(t.getnames()) == sorted(
            [pkg.name] + [f"{pkg.name}/{n}" for n in ("keiryo.json", "model.onnx", "model.sig")]
        )
    rep = verify(pkg, keys[1])
    assert rep["files"] == ["keiryo.json", "model.onnx"] and rep["golden_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(
    "tamper,message",
    [
        (
            lambda p: p.joinpath("model.onnx").write_bytes(p.joinpath("model.onnx").read_bytes()[:-1] + b"\0"),
            "changed: model.onnx",
        ),
        (lambda p: p.joinpath("keiryo.json").unlink(), "missing: keiryo.json"),
        (lambda p: p.joinpath("evil.py").write_text("import os"), "extra: evil.py"),
        (lambda p: p.joinpath("model.sig").unlink(), "not signed"),
    ],
)
def test_any_changed_missing_or_extra_file_fails(pkg, keys, tmp_path, tamper, message):
    p = _copy(pkg, tmp_path)
    tamper(p)
    with pytest.raises(IntegrityError, match=message):
        verify(p, keys[1])


def test_a_package_signed_by_another_key_is_refused(pkg, tmp_path):
    _, other_pub = keygen(tmp_path / "other.pem")
    with pytest.raises(IntegrityError, match="not made with other.pub.pem"):
        verify(pkg, other_pub)


def test_golden_vectors_that_do_not_reproduce_fail_even_when_resigned(pkg, keys, tmp_path):
    from keiryo.packages.signing import sign_dir

    p = _copy(pkg, tmp_path)
    m = json.loads((p / "keiryo.json").read_text())
    m["golden"]["outputs"]["logits"][0][0] += 1.0
    (p / "keiryo.json").write_text(json.dumps(m))
    (p / "model.sig").unlink()
    sign_dir(p, keys[0])
    with pytest.raises(IntegrityError, match="golden vectors do not reproduce"):
        verify(p, keys[1])


@pytest.mark.parametrize("name", ["../evil", "Tiny", "a/b", "", "x" * 80])
def test_bad_package_names_are_refused_and_nothing_is_written(tiny_results, keys, tmp_path, name):
    out, _ = tiny_results
    with pytest.raises(ConfigError, match="name"):
        package(out, name=name, version="1", private_key=keys[0], out=tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_cli_keygen_package_verify(tiny_results, tmp_path, capsys):
    out, _ = tiny_results
    code, _, err = run_cli("keygen", "--out", str(tmp_path / "k.pem"), capsys=capsys)
    assert code == 0, err
    assert oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    code, _, err = run_cli("keygen", "--out", str(tmp_path / "k.pem"), capsys=capsys)
    assert code != 0 and "refusing to overwrite a key" in one_line_error(err)
    pkg = tmp_path / "pkg"
    args = ["package", str(out), "--name", "tiny", "--version", "2", "--key", str(tmp_path / "k.pem"), "--out", str(pkg)]
    code, outp, err = run_cli(*args, "--candidate", "int8", capsys=capsys)
    assert code == 0, err
    assert read_manifest(pkg)["recipe"]["name"] == "int8"
    code, outp, err = run_cli("verify", str(pkg), "--public-key", str(tmp_path / "k.pub.pem"), capsys=capsys)
    assert code == 0 and "verified tiny 2 (onnx): 2 files match the signature; golden vectors reproduce" in outp
    code, _, err = run_cli(*args, "--candidate", "nope", capsys=capsys)
    assert code != 0 and "no candidate 'nope'" in one_line_error(err)
    (pkg / "model.onnx").write_bytes(b"x")
    code, _, err = run_cli("verify", str(pkg), "--public-key", str(tmp_path / "k.pub.pem"), capsys=capsys)
    assert code != 0 and "changed: model.onnx" in one_line_error(err)


def test_keygen_overwrite_always_leaves_a_private_key_readable_by_its_owner_only(tmp_path):
    import stat

    from keiryo.packages import keygen

    priv = tmp_path / "k.pem"
    priv.write_text("old")
    priv.chmod(0o644)  # a world-readable file in the way
    keygen(priv, overwrite=True)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
