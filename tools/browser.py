"""A headless Chromium driven over the DevTools protocol: what the UI tests and the screenshot script see.

It uses Debian's ``chromium`` package (``apt-get install chromium``; ``make test`` installs it when run as root) and
the ``websockets`` client Prefect already depends on, so nothing is downloaded at run time: no browser bundles, no
drivers. Pages are loopback pages; every wait is bounded.

    with Browser(width=1600, height=1000) as b:
        b.goto("http://127.0.0.1:5000/#/experiments/1/runs/abc")
        b.wait_for("document.querySelectorAll('img').length > 0", timeout=60)
        b.screenshot("run.png")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

PACKAGE = "chromium"  # Debian's package and its command
INSTALL_HINT = f"the headless browser `{PACKAGE}` is not installed: apt-get install {PACKAGE} (Debian's package)"


class BrowserError(RuntimeError):
    """The browser is missing, did not start, or a page did not reach the state waited for."""


def chromium_path() -> str:
    """The chromium executable, or BrowserError naming the package to install."""
    path = os.environ.get("CHROMIUM") or shutil.which(PACKAGE) or shutil.which("chromium-browser")
    if not path:
        raise BrowserError(INSTALL_HINT)
    return path


class Browser:
    """One headless chromium with one page, driven over the DevTools protocol (CDP) on loopback."""

    def __init__(self, width: int = 1600, height: int = 1000, start_timeout: float = 60.0):
        from websockets.sync.client import connect

        self._dir = tempfile.mkdtemp(prefix="chromium-")
        self._proc = subprocess.Popen(
            [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-extensions", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self._dir}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = self._port(start_timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if not pages:
                raise BrowserError("chromium started without a page")
            self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        except BaseException:
            self.close()
            raise
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _port(self, timeout: float) -> int:
        """chromium writes the port it chose to <user-data-dir>/DevToolsActivePort once it listens."""
        marker = Path(self._dir) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode} before listening")
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise BrowserError(f"chromium did not listen within {timeout:.0f} s")

    def send(self, method: str, timeout: float = 60.0, **params: Any) -> dict:
        """One CDP command; its result (events received meanwhile are dropped)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {timeout:.0f} s")
            msg = json.loads(self._ws.recv(timeout=left))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable; promises awaited)."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            detail = res["exceptionDetails"]
            raise BrowserError(f"page script failed: {detail.get('exception', {}).get('description') or detail}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str | None = None) -> Any:
        """Poll until ``expression`` is truthy; its value. BrowserError naming ``what`` after ``timeout`` s."""
        deadline, error = time.monotonic() + timeout, ""
        while True:
            try:  # while the page loads, document.body may still be null
                value = self.evaluate(expression)
                if value:
                    return value
            except BrowserError as e:
                error = f" (last: {e})"
            if time.monotonic() > deadline:
                raise BrowserError(f"{what or expression}: not there after {timeout:.0f} s{error}")
            time.sleep(0.25)

    def click(self, selector: str) -> bool:
        """Click the first element matching the CSS ``selector``; False when there is none."""
        return bool(self.evaluate(f"(e => e ? (e.click(), true) : false)(document.querySelector({json.dumps(selector)}))"))

    def click_at(self, x: float, y: float) -> None:
        """A left click with the mouse at page point (``x``, ``y``), as pointer events."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      buttons=1 if kind == "mousePressed" else 0, clickCount=0 if kind == "mouseMoved" else 1)

    def settle(self, seconds: float = 1.0, timeout: float = 30.0) -> None:
        """Wait until no <img> is still loading and the page's height stops changing for ``seconds``."""
        probe = "[document.body.scrollHeight, [...document.images].filter(i => !i.complete).length]"
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            now = self.evaluate(probe)
            if now != last or now[1]:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return
            time.sleep(0.2)

    def screenshot(self, path: str | Path) -> Path:
        """The viewport as a PNG, written atomically."""
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
