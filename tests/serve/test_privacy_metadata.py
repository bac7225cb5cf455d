"""The OIP model metadata (GET /v2/models/{name}) carries the signed manifest's DP record under ``parameters.privacy``,
so whoever deploys a model can see what it promises; a model trained without DP has no such key."""

# no ``from __future__ import annotations``: kept like the other serve tests (FastAPI reads annotations at run time)
import json
import shutil

from keiryo.packages import package
from keiryo.packages.store import PackageStore
from keiryo.serve import ServeSettings, create_app

KEY = "privacy-metadata-key-0123"

RECORD = {  # as keiryo train --dp writes it (keiryo.privacy.dp.DPRun.record), abridged
    "mechanism": "DP-SGD",
    "epsilon": 7.995,
    "delta": 1e-4,
    "accountant": "prv",
    "epsilon_by_accountant": {"prv": 7.995, "rdp": 8.7},
    "noise_multiplier": 1.68,
    "sample_rate": 0.2,
    "steps": 150,
    "max_grad_norm": 0.5,
}


def test_model_metadata_parameters_carry_the_manifests_privacy_record(signed, tmp_path):
    from fastapi.testclient import TestClient

    results = tmp_path / "results"
    shutil.copytree(signed["results"], results)
    res = json.loads((results / "results.json").read_text())
    res["model"]["privacy"] = RECORD  # the input model's DP record, as compress writes it for DP weights
    (results / "results.json").write_text(json.dumps(res))
    dp = package(results, name="dp", version="1.0.0", private_key=signed["priv"], out=tmp_path / "dp-1.0.0", candidate="fp32")
    assert json.loads((dp / "keiryo.json").read_text())["privacy"] == RECORD  # signed with the rest

    store = PackageStore(tmp_path / "r")
    for pkg, name in ((signed["v1"], "tiny"), (dp, "dp")):
        store.push(pkg, signed["pub"])
        store.promote(name, "1.0.0", "production")
    settings = ServeSettings(
        models=["tiny@1.0.0", "dp@1.0.0"], public_key=str(signed["pub"]), api_keys=[KEY], poll_s=None,
        tuf_cache=str(tmp_path / "c"),
    )  # fmt: skip
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(store, settings)) as c:
        got = c.get("/v2/models/dp", headers=auth)
        assert got.status_code == 200, got.text
        assert got.json()["parameters"]["privacy"] == RECORD
        assert c.get("/v2/models/dp/versions/1.0.0", headers=auth).json()["parameters"]["privacy"] == RECORD
        plain = c.get("/v2/models/tiny", headers=auth).json()
        assert "privacy" not in plain["parameters"] and plain["parameters"]["ref"] == "tiny@1.0.0"
