"""Drive a headless chromium from the tests, with nothing but the standard library.

Chromium speaks the Chrome DevTools Protocol (CDP) over two pipes when started with
``--remote-debugging-pipe``: it reads NUL-terminated JSON commands on fd 3 and writes replies
and events on fd 4. That is all the tests need: open a report from disk, evaluate JavaScript,
click, collect console errors and take screenshots.

Screenshot for the README (full page at 1440 px)::

    python tests/browser_util.py runs/demo/index.html docs/report.png --width 1440
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--mute-audio", "--force-device-scale-factor=1",
         "--remote-debugging-pipe")
# Real WebGL on machines without a GPU: ANGLE on SwiftShader (software), as the explorer needs.
WEBGL_FLAGS = tuple(f for f in FLAGS if f != "--disable-gpu") + (
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader")
# A browser without WebGL at all, for the PNG fallback.
NO_WEBGL_FLAGS = FLAGS + ("--disable-3d-apis",)
# Installed before the page's own scripts: records alert() calls instead of showing them.
_ALERT_TRAP = ("window.__alerts = []; ['alert', 'confirm', 'prompt'].forEach(function (n) {"
               " window[n] = function (m) { window.__alerts.push(n + ':' + String(m)); }; });")


def find_chromium() -> str | None:
    """Path of a chromium/chrome binary: ``$EVALKIT_CHROMIUM`` first, then the usual names."""
    explicit = os.environ.get("EVALKIT_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """A headless chromium with one page, driven over the DevTools pipe.

    Use as a context manager. ``events`` collects every CDP event of the page; ``errors()``
    picks the console errors and uncaught exceptions out of them.
    """

    def __init__(self, binary: str | None = None, *, width: int = 1440, height: int = 900,
                 timeout: float = 30.0, flags: tuple | None = None):
        self.flags = FLAGS if flags is None else tuple(flags)
        self.binary = binary or find_chromium()
        if not self.binary:
            raise FileNotFoundError("no chromium binary found (set EVALKIT_CHROMIUM)")
        self.width, self.height, self.timeout = width, height, timeout
        self.events: list[dict] = []
        self._next_id = 0
        self._buffer = b""
        self._session = None

    # -- process and pipes
    def __enter__(self) -> "Browser":
        self._profile = tempfile.mkdtemp(prefix="evalkit-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds():  # chromium expects its command pipe on fd 3 and replies on fd 4
            # Move both ends above fd 4 first, so neither dup2 clobbers the other.
            read_end = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [self.binary, *self.flags, f"--user-data-dir={self._profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
            preexec_fn=child_fds, pass_fds=(3, 4))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
            attached = self.call("Target.attachToTarget",
                                 {"targetId": target["targetId"], "flatten": True},
                                 session=False)
            self._session = attached["sessionId"]
            for domain in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
                self.call(domain)
            self.call("Page.addScriptToEvaluateOnNewDocument", {"source": _ALERT_TRAP})
            self.set_viewport(self.width, self.height)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._proc.poll() is None:
                try:
                    self.call("Browser.close", session=False, timeout=5)
                except Exception:
                    pass
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
        finally:
            for fd in (self._to_chrome, self._from_chrome):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    # -- protocol
    def call(self, method: str, params: dict | None = None, *, session: bool = True,
             timeout: float | None = None) -> dict:
        """Send one CDP command and return its result (events seen meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session:
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode("utf-8") + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._on_event(reply)

    def wait_for(self, method: str, timeout: float | None = None) -> dict:
        """Wait for the next event called ``method`` (events already seen don't count)."""
        start = len(self.events)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for event in self.events[start:]:
                if event.get("method") == method:
                    return event
            start = len(self.events)
            self._on_event(self._receive(deadline))

    def _on_event(self, message: dict) -> None:
        if "method" not in message:
            return
        self.events.append(message)
        if message["method"] == "Page.javascriptDialogOpening":  # never leave a dialog open
            self.call("Page.handleJavaScriptDialog", {"accept": True})

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer in time; stderr:\n"
                                   f"{self.stderr_text()[-2000:]}")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise CDPError(f"chromium closed the pipe; stderr:\n"
                                   f"{self.stderr_text()[-2000:]}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    # -- page helpers
    def set_viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def open(self, path_or_url) -> None:
        """Load a file (path) or URL and wait for its load event."""
        url = str(path_or_url)
        if "://" not in url:
            url = Path(url).resolve().as_uri()
        start = len(self.events)
        self.call("Page.navigate", {"url": url})
        if not any(e.get("method") == "Page.loadEventFired" for e in self.events[start:]):
            self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        """Value of a JavaScript expression in the page (JSON-serialisable results only)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) in the middle of the element."""
        box = self.evaluate(
            f"(function () {{ var e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " var r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()")
        if box is None:
            raise CDPError(f"no element matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"],
                                                   "button": "left", "clickCount": 1})

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                    for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append("exception: " + str(details.get("exception", {}).get(
                    "description", details.get("text"))))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry.get('text')} "
                             f"{entry.get('url', '')}")
        return found

    def requested_urls(self) -> list[str]:
        """Every URL the page asked the network stack for (data: and file: included)."""
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def dialogs(self) -> list[str]:
        """Messages of alert/confirm/prompt dialogs the page tried to open."""
        trapped = self.evaluate("window.__alerts || []") or []
        native = [e["params"].get("message", "") for e in self.events
                  if e.get("method") == "Page.javascriptDialogOpening"]
        return list(trapped) + native

    def screenshot(self, png_path, *, full_page: bool = True) -> Path:
        """Save a PNG of the page at the current width (the whole page when ``full_page``)."""
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            self.set_viewport(self.width, max(int(size["height"]), 1))
            shot = self.call("Page.captureScreenshot", {"format": "png",
                                                        "captureBeyondViewport": True})
        else:
            shot = self.call("Page.captureScreenshot", {"format": "png", "clip": {
                "x": 0, "y": 0, "width": self.width, "height": self.height, "scale": 1}})
        if full_page:
            self.set_viewport(self.width, self.height)
        path = Path(png_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def screenshot(html_path, png_path, *, width: int = 1440, height: int | None = None,
               binary: str | None = None) -> Path:
    """PNG screenshot of a report opened from disk, ``width`` CSS px wide.

    ``height=None`` captures the whole page; a number captures just the top of it.
    """
    with Browser(binary, width=width, height=height or 900, flags=WEBGL_FLAGS) as browser:
        browser.open(html_path)
        time.sleep(1.5)  # the explorer draws its WebGL panels after load
        return browser.screenshot(png_path, full_page=height is None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Screenshot an HTML report with headless chromium.")
    parser.add_argument("html")
    parser.add_argument("png")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=None,
                        help="viewport height; default: the whole page")
    args = parser.parse_args(argv)
    print(screenshot(args.html, args.png, width=args.width, height=args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
