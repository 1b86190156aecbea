"""Screenshot a page of the MLflow UI with headless Chromium, driven over the DevTools protocol.

``chromium --screenshot`` can only shoot once after load. MLflow's UI is a single-page app that
fetches runs after load and, on a local host, opens its Assistant side panel on first visit.
So this drives Chromium over ``--remote-debugging-pipe`` (JSON messages ending in NUL on fds 3
and 4; standard library only): it pre-sets the UI's localStorage so the panel stays shut, waits
until the page shows the expected text, clicks the asked-for toggles, grows the viewport until
the page no longer scrolls, then shoots.

Used by scripts/screenshot_ui.sh; runs with any Python 3.9+.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The UI's useLocalStorage hook stores `<key>_v<version>` = JSON value (mlflow 3.17 bundle).
_QUIET_ASSISTANT = """
try {
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
} catch (e) {}
"""

# How far the page's main scroller overflows. The UI scrolls inside its own containers, so the
# document height alone does not say how tall the viewport must be; only page-sized scrollers
# count, because small lists (a compare page's params) have a fixed height and scroll by themselves.
_OVERFLOW_JS = """
(() => {
  let extra = document.documentElement.scrollHeight - window.innerHeight;
  for (const el of document.querySelectorAll('*')) {
    const style = getComputedStyle(el);
    if (/(auto|scroll)/.test(style.overflowY) && el.clientHeight > 0.5 * window.innerHeight) {
      extra = Math.max(extra, el.scrollHeight - el.clientHeight);
    }
  }
  return Math.max(0, extra);
})()
"""


class Browser:
    """One headless Chromium and a flat DevTools session on its first page."""

    def __init__(self, chromium: str, width: int, height: int) -> None:
        self.profile = tempfile.mkdtemp(prefix="ser-ui-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Park the child's ends above 9 so dup2 onto 3 and 4 cannot clobber one another.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child_r, from_child_w)]
        for fd in (to_child_r, from_child_w):
            os.close(fd)

        def wire_pipes() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--remote-debugging-pipe",
                "--disable-gpu",
                "--no-sandbox",  # we run as root in a container; nothing but 127.0.0.1 is visited
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # Chromium logs GPU/dbus noise that says nothing about us
            pass_fds=(3, 4),
            preexec_fn=wire_pipes,
        )
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.session = ""
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        attached = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self.session = attached["sessionId"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are dropped."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def set_viewport(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:  # a browser that will not close politely is killed below
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        shutil.rmtree(self.profile, ignore_errors=True)


def wait_for_text(browser: Browser, needles: list[str], timeout: float) -> None:
    """Poll until the page's visible text holds every needle; say which are missing on timeout."""
    deadline = time.monotonic() + timeout
    missing = needles
    while time.monotonic() < deadline:
        text = browser.evaluate("document.body ? document.body.innerText : ''") or ""
        missing = [n for n in needles if n not in text]
        if not missing:
            return
        time.sleep(0.5)
    raise TimeoutError(f"page still lacks {missing} after {timeout:.0f} s")


def click(browser: Browser, label: str) -> None:
    """Click the control whose aria-label is ``label`` (a UI toggle), or fail naming it."""
    found = browser.evaluate(
        f"""(() => {{
          const el = document.querySelector('[aria-label={json.dumps(label)}]');
          if (!el) return false;
          el.click();
          return true;
        }})()"""
    )
    if not found:
        raise RuntimeError(f"--click: no control with aria-label {label!r} on the page")


def shoot(args: argparse.Namespace) -> None:
    browser = Browser(args.chromium, args.width, args.height)
    try:
        browser.call("Page.enable")
        browser.call("Page.addScriptToEvaluateOnNewDocument", source=_QUIET_ASSISTANT)
        height = args.height
        browser.set_viewport(args.width, height)
        browser.call("Page.navigate", url=args.url)
        wait_for_text(browser, args.expect, args.timeout)
        for label in args.click:
            click(browser, label)
        time.sleep(args.settle)  # let charts finish drawing after the data arrived
        if args.full:
            for _ in range(5):  # growing the viewport can reflow; stop once nothing overflows
                extra = int(browser.evaluate(_OVERFLOW_JS) or 0)
                if extra <= 0 or height >= args.max_height:
                    break
                height = min(args.max_height, height + extra)
                browser.set_viewport(args.width, height)
                time.sleep(args.settle)
        shot = browser.call("Page.captureScreenshot", format="png")
        out = Path(args.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(base64.b64decode(shot["data"]))
        tmp.replace(out)  # a reader never sees half a PNG
        print(f"wrote {out} ({out.stat().st_size} bytes, {args.width}x{height})")
    finally:
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("output")
    parser.add_argument(
        "--expect",
        action="append",
        default=[],
        help="text the page must show before the shot (repeatable)",
    )
    parser.add_argument(
        "--click",
        action="append",
        default=[],
        help="aria-label of a control to click once the page is ready (repeatable)",
    )
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--full", action="store_true", help="grow the viewport to fit the page")
    parser.add_argument("--max_height", type=int, default=4000)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args()
    if not args.url.startswith("http://127.0.0.1:"):
        parser.error(f"url must be on http://127.0.0.1:<port>, got {args.url!r}")
    shoot(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
