"""``keiryo app`` in a real browser: Debian's Chromium driven by Playwright against the page served by a live
server over a registry made here. A digit is drawn with mouse events and must be classified right by both
engines; promotions, sign-in, an unreachable server and bad uploads are handled on the page. Screenshots
are kept in ``test-artifacts/`` (``$KEIRYO_TEST_ARTIFACTS``)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from keiryo.packages import keygen, package
from keiryo.packages.store import PackageStore
from keiryo.runtime.web import launch_chromium, unavailable
from keiryo.testing.live import free_port

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"browser tests: {unavailable()}")

API = "page-test-key-0123456789"
ARTIFACTS = Path(os.environ.get("KEIRYO_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
CELL = 32  # the 256-px pad over the digits' 8x8 grid


@pytest.fixture(scope="module")
def text_results(tmp_path_factory):
    """A tiny text classifier's compress output: a package the page must grey out (not an image model)."""
    from keiryo.benchmark import BenchConfig
    from keiryo.data import DataSpec, load_data
    from keiryo.model import load_model
    from keiryo.pipeline import RunOptions, compress, load_recipe

    data = load_data(DataSpec(source="tokens", options={"samples": 60, "vocab": 30, "seq": 8}, calib_size=8))
    h = load_model(
        "zoo:text_encoder", data, output_name="logits", options={"vocab": 30, "dim": 8, "heads": 2, "layers": 1, "ffn": 16}
    )
    out = tmp_path_factory.mktemp("text") / "out"
    opts = RunOptions(bench=BenchConfig(iterations=5, warmup=1, throughput_iterations=1, throughput_batch=2), progress=False)
    compress(h, data, [load_recipe("fp32")], out, opts=opts)
    return out


@pytest.fixture(scope="module")
def colors_results(tmp_path_factory):
    """An RGB classifier from an image folder (red vs blue, 16x16): the generic preprocessing path of the page."""
    from PIL import Image

    from keiryo.benchmark import BenchConfig
    from keiryo.data import DataSpec, load_data
    from keiryo.model import ModelSpec, load_model
    from keiryo.pipeline import RunOptions, compress, load_recipe
    from keiryo.tasks import get_task
    from keiryo.train import TrainConfig, train

    root = tmp_path_factory.mktemp("colors")
    rng = np.random.default_rng(0)
    for name, rgb in (("blue", (30, 60, 220)), ("red", (220, 40, 30))):
        (root / "images" / name).mkdir(parents=True)
        for i in range(40):
            px = np.clip(np.array(rgb) + rng.normal(0, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "images" / name / f"{i}.png")
    data = load_data(DataSpec(source=str(root / "images"), options={"size": 16, "channels": 3}))
    h = load_model(ModelSpec(source="keiryo.testing:tiny_cnn", options={"width": 4}), data, output_name="logits")
    cfg = TrainConfig(epochs=20, lr=1e-2, batch_size=8, patience=20)
    res = train(h, data, get_task("classification").bind(h.output_names), cfg, progress=False)
    assert res.best_val == 1.0  # red and blue are told apart (else the page test below would say nothing)
    opts = RunOptions(bench=BenchConfig(iterations=5, warmup=1, throughput_iterations=1, throughput_batch=2), progress=False)
    compress(h, data, [load_recipe("fp32")], root / "out", opts=opts)
    return root / "out"


@contextlib.contextmanager
def keiryo_cli(*args: str):
    """``python -m keiryo ARGS`` as its own process; yields (base url, login code) once the printed login
    link answers. Its output is drained (and kept) by a thread, so the server never blocks on a full pipe."""
    proc = subprocess.Popen([sys.executable, "-m", "keiryo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"http://\S+/app/login\?code=\S+", line):
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert found.wait(120), f"no login link printed:\n{''.join(lines)[-2000:]}"
        link = next(m.group(0) for ln in lines if (m := re.search(r"http://\S+/app/login\?code=\S+", ln)))
        url, code = link.split("/app/login?code=")
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield url, code
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def world(tiny_results, text_results, colors_results, tmp_path_factory):
    """digits 1.0.0 (fp32) at staging, 2.0.0 (int8) at production, a text model; `keiryo app` over that registry."""
    out, _ = tiny_results
    d = tmp_path_factory.mktemp("app")
    priv, pub = keygen(d / "key.pem")
    store = PackageStore(d / "registry")
    for version, cand, alias in (("1.0.0", "fp32", "staging"), ("2.0.0", "int8", "production")):
        store.push(package(out, name="digits", version=version, private_key=priv, out=d / version, candidate=cand), pub)
        store.promote("digits", version, alias)
    store.push(package(text_results, name="text", version="1.0.0", private_key=priv, out=d / "text", candidate="fp32"), pub)
    store.promote("text", "1.0.0", "production")
    store.push(package(colors_results, name="rgb", version="1.0.0", private_key=priv, out=d / "rgb", candidate="fp32"), pub)
    store.promote("rgb", "1.0.0", "production")
    args = ["app", "--registry", str(store.root), "--public-key", str(pub), "--port", str(free_port()), "--api-key", API]
    args += ["--tuf-cache", str(d / "tuf-cache"), "--poll-s", "0.3", "--session-ttl-s", "600"]
    with keiryo_cli(*args) as (url, code):
        yield {"url": url, "code": code, "store": store, "dir": d, "pub": pub}


@pytest.fixture(scope="module")
def pw():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # one per thread: every browser of the module comes from it
        yield p


@pytest.fixture(scope="module")
def browser(pw):
    b = launch_chromium(pw)
    yield b
    b.close()


@pytest.fixture
def page(browser, world):
    ctx = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{world['url']}/app/login?code={world['code']}")
    yield pg
    ctx.close()
    assert not errors, f"uncaught errors on the page: {errors}"


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _ready(page, engine: str, model: str = "digits@production", version: str | None = None, timeout: float = 30_000) -> None:
    want = f"{model}:{version}:{engine}" if version else None
    page.wait_for_function(
        "([m, e, w]) => { const r = document.body.dataset.ready || '';"
        " return w ? r === w : r.startsWith(m + ':') && r.endsWith(':' + e); }",
        arg=[model, engine, want],
        timeout=timeout,
    )


def _digit_to_draw(world, digits, tiny_trained):
    """A test digit whose binarised trace the model classifies right with a wide margin (so the drawn
    strokes, antialiased, are unambiguous): (8x8 binary mask, class)."""
    import torch

    x = digits.test.numpy()["image"][:, 0]
    y = digits.test.targets.numpy()
    masks = (x >= 0.5).astype(np.float32)
    with torch.no_grad():
        logits = tiny_trained.module(torch.from_numpy(masks[:, None])).numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ok = np.flatnonzero(p.argmax(1) == y)
    best = ok[np.argmax(p[ok, y[ok]])]
    return masks[best], str(int(y[best]))


def _draw(page, mask) -> None:
    """Fill every ink cell of an 8x8 mask with mouse strokes on the 256-px pad: two passes per row run."""
    box = page.locator("#pad").bounding_box()
    sx, sy = box["width"] / 256, box["height"] / 256
    for r in range(8):
        c = 0
        while c < 8:
            if not mask[r, c]:
                c += 1
                continue
            end = c
            while end + 1 < 8 and mask[r, end + 1]:
                end += 1
            for dy in (-8, 8):
                y = box["y"] + (r * CELL + CELL / 2 + dy) * sy
                page.mouse.move(box["x"] + (c * CELL + 8) * sx, y)
                page.mouse.down()
                page.mouse.move(box["x"] + (end * CELL + CELL - 8) * sx, y, steps=4)
                page.mouse.up()
            c = end + 1


def _predicted(page, label: str, engine: str, timeout: float = 20_000) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        _wait_label(page, label, engine, timeout)
    except PlaywrightTimeout:  # say what the page shows instead
        got = page.evaluate("() => [document.getElementById('prediction').dataset.label, document.getElementById('prediction')"
                            ".dataset.engine, document.getElementById('status').textContent]")  # fmt: skip
        raise AssertionError(f"expected {label!r} on the {engine} engine; the page shows {got}") from None


def _wait_label(page, label: str, engine: str, timeout: float) -> None:
    page.wait_for_function(
        "([l, e]) => { const p = document.getElementById('prediction');"
        " return p.dataset.label === l && p.dataset.engine === e; }",
        arg=[label, engine],
        timeout=timeout,
    )


def test_a_drawn_digit_is_classified_by_both_engines(page, world, digits, tiny_trained):
    mask, label = _digit_to_draw(world, digits, tiny_trained)
    _ready(page, "server")
    _draw(page, mask)
    _predicted(page, label, "server")
    rows = page.locator("#topk li").count()
    assert rows == 5
    # the latency panel has figures for every stage, the network one included
    for key in ("prep", "network", "inference", "total"):
        cells = page.locator(f"#latency tr[data-key={key}] td").all_inner_texts()
        assert all(c not in ("", "-") for c in cells), (key, cells)
    _shot(page, "app-server-engine")

    page.locator("input[name=engine][value=browser]").check()
    _ready(page, "browser")
    page.click("#clear")
    _draw(page, mask)
    _predicted(page, label, "browser")
    about = page.inner_text("#about-engine")
    assert "onnxruntime-web" in about and "SIMD" in about, about
    assert page.inner_text("#latency tr[data-key=network] td") == "0.00"  # nothing crosses the network in-browser
    _shot(page, "app-browser-engine")


def test_the_chooser_offers_every_alias_greys_out_a_text_model_and_follows_a_promotion(page, world):
    _ready(page, "server")
    options = page.locator("#model option")
    texts = options.all_inner_texts()
    assert any(t.startswith("digits@production (2.0.0)") for t in texts), texts
    assert any(t.startswith("digits@staging (1.0.0)") for t in texts), texts
    text = page.locator("#model option[value='text@production']")
    assert text.is_disabled()
    assert "not an image classifier" in text.inner_text() or "inputs" in text.inner_text()

    page.select_option("#model", "digits@staging")
    _ready(page, "server", "digits@staging", "1.0.0")
    world["store"].promote("digits", "2.0.0", "staging")
    try:
        _ready(page, "server", "digits@staging", "2.0.0", timeout=20_000)  # no reload: the page follows the alias
        assert "2.0.0" in page.inner_text("#about-model")
    finally:
        world["store"].promote("digits", "1.0.0", "staging", downgrade=True)


def test_no_session_or_a_bad_key_shows_the_sign_in_never_a_blank_page(browser, world):
    ctx = browser.new_context()
    pg = ctx.new_page()
    try:
        pg.goto(f"{world['url']}/app/")
        pg.wait_for_selector("#login:not([hidden])")
        assert pg.locator("#main").is_hidden()
        pg.fill("#login-key", "not-the-key-at-all-000")
        pg.click("#login-form button")
        pg.wait_for_function("() => document.getElementById('login-reason').textContent.includes('refused')")
        pg.fill("#login-key", API)  # a real key signs in; the page keeps only the HttpOnly cookie
        pg.click("#login-form button")
        _ready(pg, "server")
        cookies = ctx.cookies()
        assert [c["name"] for c in cookies] == ["keiryo_app"] and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
        assert API not in pg.content()
        # an expired or forged session: the next request is a 401 and the page asks to sign in again
        ctx.add_cookies([{"name": "keiryo_app", "value": "1.forged", "url": world["url"]}])
        assert pg.evaluate("() => window.keiryoApp.engine.infer(new Float32Array(64)).then(() => 200, (e) => e.status)") == 401
        pg.wait_for_selector("#login:not([hidden])", timeout=10_000)  # the model list's next poll: 401 -> sign in
        assert "Session refused" in pg.inner_text("#login-reason") and pg.locator("#main").is_hidden()
        _shot(pg, "app-sign-in")
    finally:
        ctx.close()


def test_an_rgb_classifier_from_an_image_folder_classifies_uploads_on_both_engines(page, world, tmp_path):
    """The generic path: 3 channels, resized, scaled to [0, 1] as the manifest's image_folder preprocessing says."""
    from PIL import Image

    _ready(page, "server")
    page.select_option("#model", "rgb@production")
    _ready(page, "server", "rgb@production")
    for i, (engine, color, rgb) in enumerate((("server", "red", (230, 30, 20)), ("browser", "blue", (20, 50, 230)))):
        if engine == "browser":
            page.locator("input[name=engine][value=browser]").check()
            _ready(page, "browser", "rgb@production")
        photo = tmp_path / f"{i}.png"
        Image.new("RGB", (300, 200), rgb).save(photo)  # any size: resized to the model's 16x16
        page.set_input_files("#upload", str(photo))
        _predicted(page, color, engine)


def test_an_unreachable_server_is_said_and_the_in_browser_engine_offered(page, world, digits, tiny_trained):
    mask, label = _digit_to_draw(world, digits, tiny_trained)
    _ready(page, "server")
    page.wait_for_function("() => !!document.body.dataset.warm")  # the in-browser engine is opened ahead
    page.route("**/v2/**", lambda route: route.abort("connectionrefused"))
    _draw(page, mask)
    page.wait_for_function("() => document.getElementById('status').textContent.includes('Server unreachable')")
    page.click("#status button")  # "Use the in-browser engine"
    _ready(page, "browser")
    page.click("#clear")
    _draw(page, mask)
    _predicted(page, label, "browser")


def test_an_upload_that_is_not_an_image_is_refused_on_the_page_and_a_big_photo_is_resized(page, world, tmp_path):
    from PIL import Image

    _ready(page, "server")
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a PNG")
    page.set_input_files("#upload", str(bad))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('not an image')")
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (900, 1400, 3), dtype=np.uint8)).save(photo)
    before = int(page.get_attribute("#prediction", "data-frames") or 0)
    page.set_input_files("#upload", str(photo))
    page.wait_for_function("(n) => Number(document.getElementById('prediction').dataset.frames) > n", arg=before)
    assert "1400x900, resized" in page.inner_text("#status")


def test_the_page_is_isolated_and_its_assets_never_escape_static(world):
    url = world["url"]
    r = httpx.get(f"{url}/app/")
    assert r.status_code == 200
    assert (
        r.headers["cross-origin-opener-policy"] == "same-origin" and r.headers["cross-origin-embedder-policy"] == "require-corp"
    )
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{url}/app/static/vendor/ort-wasm-simd-threaded.wasm").headers["content-type"] == "application/wasm"
    for rel in ("../routes.py", "..%2Froutes.py", "%2e%2e/sessions.py", "vendor/../../__init__.py", ".built", "nope.js"):
        assert httpx.get(f"{url}/app/static/{rel}").status_code == 404, rel
    # the API needs a session; a wrong login code sets none
    assert httpx.get(f"{url}/app/api/models").status_code == 401
    r = httpx.get(f"{url}/app/login", params={"code": "guess"}, follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = httpx.get(f"{url}/app/login", params={"code": world["code"]}, follow_redirects=False)
    assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"]
    cookie = r.headers["set-cookie"].split(";")[0]
    models = httpx.get(f"{url}/app/api/models", headers={"Cookie": cookie}).json()["models"]
    assert {m["id"] for m in models} == {"rgb@production", "digits@production", "digits@staging", "text@production"}
    # the in-browser engine gets the signed model bytes; the text model is refused for it
    got = httpx.get(f"{url}/app/api/models/digits@production/versions/2.0.0/model", headers={"Cookie": cookie})
    assert got.status_code == 200 and len(got.content) > 1000
    assert (
        httpx.get(f"{url}/app/api/models/digits@production/versions/9.9.9/model", headers={"Cookie": cookie}).status_code == 404
    )


def test_the_browser_runtime_matches_python_onnxruntime_on_the_digits_test_set(tiny_results, digits):
    """Parity: onnxruntime-web in Chromium vs Python onnxruntime, fp32 and int8, on all test digits."""
    from keiryo.runtime import open_session

    out, results = tiny_results
    x = digits.test.numpy()
    for cand in ("fp32", "int8"):
        path = out / next(c["artifact"] for c in results["candidates"] if c["name"] == cand)
        with open_session("onnxruntime", path) as s:
            ref = s.run(x)[0]
        with open_session("web", path) as w:
            got = w.run(x)[0]
            assert w.info["simd"] is True and "chromium" in w.info["browser"]
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        assert agree >= 0.995, (cand, agree)
        if cand == "fp32":
            np.testing.assert_allclose(got, ref, atol=1e-4)


def test_the_camera_feeds_frames_continuously_until_stopped(world, pw):
    """Chromium's fake camera (a moving test pattern) stands in for a webcam."""
    b = launch_chromium(pw, ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
    try:
        ctx = b.new_context()
        ctx.grant_permissions(["camera"], origin=world["url"])
        pg = ctx.new_page()
        pg.goto(f"{world['url']}/app/login?code={world['code']}")
        _ready(pg, "server")
        pg.click("#camera")
        pg.wait_for_function("() => Number(document.getElementById('prediction').dataset.frames) >= 10", timeout=20_000)
        assert pg.locator("#video").is_visible() and pg.locator("#pad").is_hidden()
        assert pg.inner_text("#camera") == "Stop camera"
        pg.click("#camera")
        assert pg.locator("#pad").is_visible()
        n = int(pg.get_attribute("#prediction", "data-frames"))
        time.sleep(0.5)
        assert int(pg.get_attribute("#prediction", "data-frames")) <= n + 1  # stopped: no more frames
    finally:
        b.close()


def test_keiryo_serve_app_puts_the_page_on_an_inference_server(world, tmp_path):
    args = ["serve", "--registry", str(world["store"].root), "--public-key", str(world["pub"]), "--port", str(free_port())]
    args += ["--tuf-cache", str(tmp_path / "cache"), "--model", "digits@production", "--api-key", API, "--app"]
    with keiryo_cli(*args) as (url, code):
        r = httpx.get(f"{url}/app/login", params={"code": code}, follow_redirects=True, timeout=5)
        assert r.status_code == 200 and '<canvas id="pad"' in r.text
        cookie = r.request.headers.get("cookie") or ""
        assert cookie.startswith("keiryo_app=")
        models = httpx.get(f"{url}/app/api/models", headers={"Cookie": cookie}).json()["models"]
        assert [m["id"] for m in models] == ["digits"] and models[0]["alias"] == "production"
