"""``create_app(..., extra_routers=[mount])``: more endpoints mounted on the FastAPI app after the core
routes, with the server and the same key check (the extension point another app builds on)."""

# no ``from __future__ import annotations``: FastAPI reads the test route's annotations at run time
import json

import numpy as np

from keiryo.packages.store import PackageStore
from keiryo.serve import ServeSettings, create_app

KEY = "extension-key-0123456789"


def test_an_extra_router_is_mounted_with_the_server_and_the_key_check(signed, tmp_path, digits):
    from fastapi import Request
    from fastapi.testclient import TestClient

    store = PackageStore(tmp_path / "r")
    store.push(signed["v1"], signed["pub"])
    store.promote("tiny", "1.0.0", "production")
    seen = {}

    def mount(api, server, authorize):
        seen["core"] = {r.path for r in api.routes} >= {"/v2/health/ready", "/v2/models/{name}/infer"}

        @api.post("/app/classify")
        async def classify(request: Request) -> dict:
            authorize(request.headers.get("authorization"))
            x = np.asarray(json.loads(await request.body())["x"], np.float32)
            out = await server.run(server.get("tiny"), {"image": x})  # the one inference path: the batcher
            return {"argmax": out["logits"].argmax(1).tolist()}

    settings = ServeSettings(
        models=["tiny@1.0.0"], public_key=str(signed["pub"]), api_keys=[KEY], poll_s=None, tuf_cache=str(tmp_path / "c")
    )
    x = digits.test.inputs["image"][:3].numpy()
    with TestClient(create_app(store, settings, extra_routers=[mount])) as c:
        assert seen == {"core": True}
        r = c.post("/app/classify", headers={"Authorization": f"Bearer {KEY}"}, content=json.dumps({"x": x.tolist()}))
        assert r.status_code == 200, r.text
        core = c.post(
            "/v2/models/tiny/infer",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]},
        ).json()
        want = np.asarray(core["outputs"][0]["data"]).reshape(3, 10).argmax(1).tolist()
        assert r.json() == {"argmax": want}
        refused = c.post("/app/classify", content=b"{}")
        assert refused.status_code == 401 and refused.json() == {"error": "missing or invalid API key"}
