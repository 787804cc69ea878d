"""Headless Chromium for the tests: load a page, collect its console errors and failed loads, take a screenshot.

Driven over the DevTools protocol (a websocket) rather than `chromium --screenshot` alone, because the command
line cannot tell whether the page logged an error or failed to load an image. Debian's `chromium` package;
`make setup` installs it when missing (CI's machine starts without it).
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageLoad:
    url: str
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed requests
    screenshot: bytes = b""  # PNG
    title: str = ""


class _DevTools:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        """A JavaScript expression's value in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 60):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {expression}")
            time.sleep(0.2)

    def set_files(self, selector: str, paths: list[str]) -> None:
        """Choose files in an <input type=file>, as a user does in the file dialog."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=paths)

    def wait_for(self, event: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.events:
                if message.get("method") == event:
                    return message
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for message in events:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(f"exception: {params['exceptionDetails'].get('text')} "
                          f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            errors.append(f"request failed: {params.get('errorText')}")
    return errors


def load_page(url: str, width: int = 1200, height: int = 1600, settle_s: float = 0.5,
              actions=None) -> PageLoad:
    """Open url in a fresh headless Chromium profile, wait for the load event, run `actions(devtools)` if given
    (e.g. fill a form through Runtime.evaluate), and return the errors seen and a full-page screenshot."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed: `make setup` installs Debian's chromium package "
                           "(as root), or run `apt-get install -y chromium`")
    with tempfile.TemporaryDirectory(prefix="genray-chromium-") as profile:
        proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with connect(_page_websocket(Path(profile), proc), max_size=64 * 2**20, open_timeout=30) as ws:
                return _visit(_DevTools(ws), url, actions, settle_s)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _visit(devtools: _DevTools, url: str, actions, settle_s: float) -> PageLoad:
    for domain in ("Page", "Runtime", "Log", "Network"):
        devtools.call(f"{domain}.enable")
    devtools.call("Page.navigate", url=url)
    devtools.wait_for("Page.loadEventFired", timeout=60)
    if actions is not None:
        actions(devtools)
    time.sleep(settle_s)  # late console messages and image decodes
    devtools.call("Runtime.evaluate", expression="1")  # drains events that arrived meanwhile
    title = devtools.call("Runtime.evaluate", expression="document.title")["result"].get("value", "")
    shot = devtools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, timeout=60)
    return PageLoad(url, _errors(devtools.events), base64.b64decode(shot["data"]), title)


def _page_websocket(profile: Path, proc: subprocess.Popen) -> str:
    """Chromium writes its DevTools port to <profile>/DevToolsActivePort; the page target is listed at /json."""
    import requests

    deadline = time.monotonic() + 60
    port_file = profile / "DevToolsActivePort"
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"chromium did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    while True:
        pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=10).json() if t["type"] == "page"]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        if time.monotonic() > deadline:
            raise RuntimeError("chromium opened no page")
        time.sleep(0.1)


def upload_through_the_page(base: str, endpoint: str, path: str, height: int = 900) -> tuple[PageLoad, dict]:
    """Serve's page at base/, used as a person would: wait for its endpoint list, pick `endpoint`, choose the file
    at `path`, press Run. Returns the page load and what the page showed: the endpoint options, the widths of the
    'before' image and [width, height] of the 'after' one, and the caption under it."""
    seen: dict = {}

    def use_the_page(page: _DevTools) -> None:
        seen["options"] = page.wait_until(
            f"(() => {{ const o = [...document.querySelectorAll('#endpoint option')].map(o => o.value);"
            f" return o.includes({json.dumps(endpoint)}) ? o : null }})()")
        page.evaluate(f"document.getElementById('endpoint').value = {json.dumps(endpoint)}")
        page.set_files("#file", [path])
        page.evaluate("document.getElementById('form').requestSubmit()")
        seen["after"] = page.wait_until("(() => { const a = document.getElementById('after');"
                                        " return a.naturalWidth ? [a.naturalWidth, a.naturalHeight] : null })()")
        seen["before"] = page.wait_until("document.getElementById('before').naturalWidth")
        seen["caption"] = page.evaluate("document.getElementById('after-caption').textContent")

    return load_page(f"{base}/", actions=use_the_page, height=height), seen
