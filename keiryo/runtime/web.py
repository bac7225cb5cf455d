"""The browser as a runtime: an ONNX model run by onnxruntime-web (WebAssembly) inside headless Chromium.

The session starts Chromium through Playwright, opens keiryo's harness page (``keiryo/app/static/bench.html``,
built by ``scripts/setup`` from ``web/``) from a loopback server that sends the cross-origin-isolation
headers (so WebAssembly threads are available), and hands the model and each batch to the page. ``timed``
measures runs *inside* the page with ``performance.now()``, so the latency figures are the browser's, not
Playwright's round trips; ``info`` records the browser and the WebAssembly features (SIMD, threads) like
the CPU is recorded for native runs.

Chromium: ``$KEIRYO_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH (Debian's
``chromium`` package); Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.errors import BackendUnavailableError, InputFileError, RuntimeSessionError, first_line
from keiryo.runtime import register_runtime
from keiryo.runtime._base import SessionBase

STATIC = Path(__file__).resolve().parent.parent / "app" / "static"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # root in containers and CI; the page is keiryo's own, from loopback
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: this machine may have no network
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def chromium_path() -> str | None:
    env = os.environ.get("KEIRYO_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable() -> str | None:
    """Why the web runtime cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "the web runtime needs Playwright (pip install 'keiryo[web]')"
    if chromium_path() is None:
        return "the web runtime needs Chromium (Debian: apt-get install chromium; or set KEIRYO_CHROMIUM)"
    if not (STATIC / "bench.html").is_file() or not (STATIC / "vendor" / "ort-wasm-simd-threaded.wasm").is_file():
        return f"the page assets are not built ({STATIC}); run scripts/setup (npm ci && node build.mjs in web/)"
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
    }

    def end_headers(self) -> None:
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


class StaticServer:
    """keiryo's built page assets over loopback with cross-origin isolation, in a daemon thread."""

    def __init__(self, root: Path = STATIC):
        handler = functools.partial(_Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="keiryo-web-static", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def launch_chromium(playwright: Any, extra_args: list[str] | None = None) -> Any:
    """Headless Chromium from this machine (never a downloaded one)."""
    path = chromium_path()
    if path is None:
        raise BackendUnavailableError("Chromium (the web runtime's browser)", "web")
    return playwright.chromium.launch(executable_path=path, args=[*CHROMIUM_ARGS, *(extra_args or [])])


def _encode(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    kind = "bool" if a.dtype == np.bool_ else str(a.dtype)
    return {"type": kind, "dims": list(a.shape), "b64": base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode()}


def _decode(t: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype("uint16" if t["type"] == "float16" else t["type"]).newbyteorder("<")
    a = np.frombuffer(base64.b64decode(t["b64"]), dtype=dtype).reshape(t["dims"])
    return a.view(np.float16) if t["type"] == "float16" else a.astype(a.dtype.newbyteorder("="))


class WebSession(SessionBase):
    runtime = "web"

    def __init__(self, source: str | Path | bytes, threads: int = 1):
        why = unavailable()
        if why:
            raise RuntimeSessionError(why)
        if isinstance(source, bytes):
            model, self.path = source, Path("<bytes>")
        else:
            self.path = Path(source)
            if not self.path.is_file():
                raise InputFileError(f"{self.path}: ONNX file not found")
            model = self.path.read_bytes()
        self.threads = threads
        # Playwright's sync API belongs to the thread that starts it and refuses a thread running an asyncio
        # loop: every browser call goes through one private thread, so a session works from anywhere
        self._thread: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="keiryo-web")
        self._server: StaticServer | None = StaticServer()
        try:
            names = self._on_thread(self._open, model)
        except RuntimeSessionError as e:
            self.close()
            raise InputFileError(f"{self.path}: onnxruntime-web cannot load this model ({e})") from e
        except Exception:
            self.close()
            raise
        self.input_names = list(names["inputs"])
        self.output_names = list(names["outputs"])

    def _on_thread(self, fn: Any, *args: Any) -> Any:
        if self._thread is None:
            raise RuntimeSessionError(f"{self.path}: the web session is closed")
        return self._thread.submit(fn, *args).result()

    def _open(self, model: bytes) -> dict[str, Any]:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = launch_chromium(self._pw)
        self._page = self._browser.new_page()
        assert self._server is not None
        self._page.goto(self._server.url + "bench.html")
        self._page.wait_for_function("() => window.keiryoBench !== undefined", timeout=30_000)
        names = self._evaluate("([m, t]) => keiryoBench.open(m, t)", [base64.b64encode(model).decode(), self.threads])
        self.info: dict[str, Any] = {"browser": f"chromium {self._browser.version}", **self._evaluate("() => keiryoBench.info()")}
        return dict(names)

    def _evaluate(self, script: str, arg: Any = None) -> Any:
        try:
            return self._page.evaluate(script, arg)
        except Exception as e:
            raise RuntimeSessionError(f"{self.path}: onnxruntime-web: {first_line(e, 300)}") from e

    def _call(self, script: str, arg: Any = None) -> Any:
        return self._on_thread(self._evaluate, script, arg)

    def _named(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, Any]:
        return {k: _encode(v) for k, v in self._feed(inputs).items()}

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        return [_decode(t) for t in self._call("(f) => keiryoBench.run(f)", self._named(inputs))]

    def timed(self, inputs: dict[str, np.ndarray] | np.ndarray, warmup: int, n: int) -> np.ndarray:
        """Milliseconds of ``n`` runs after ``warmup``, timed inside the page."""
        return np.asarray(self._call("([f, w, n]) => keiryoBench.timed(f, w, n)", [self._named(inputs), warmup, n]))

    def _shutdown(self) -> None:
        for step in (lambda: self._browser.close(), lambda: self._pw.stop()):
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort: a half-open session still lets go of the rest
                pass

    def close(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._on_thread(self._shutdown)
            assert self._thread is not None
            self._thread.shutdown()
            self._thread = None
        server = getattr(self, "_server", None)
        if server is not None:
            server.close()
            self._server = None


@register_runtime("web", unavailable=unavailable)
def open_web(source: str | Path | bytes, threads: int) -> WebSession:
    return WebSession(source, threads)
