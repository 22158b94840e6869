"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``
(file descriptors 3 and 4, NUL-terminated JSON messages), so the browser tests
can type into a form and click through pages with no WebSocket library or
browser driver installed. Import as ``from cdp import Browser``."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["Browser", "CdpError"]


class CdpError(RuntimeError):
    """The browser answered a command with an error, or a wait timed out."""


class Browser:
    """Headless Chromium with one page, driven over the DevTools pipe.

    Parameters
    ----------
    binary:
        The chromium executable.
    profile:
        A fresh user-data directory.
    width, height:
        Viewport size (CSS pixels, device scale factor 1).
    """

    def __init__(self, binary: str, profile: Path, *, width: int = 1280, height: int = 900) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        # Chromium reads commands from fd 3 and writes answers to fd 4: keep our
        # ends above them, then let the shell move them into place.
        hi_r, hi_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 100), fcntl.fcntl(resp_w, fcntl.F_DUPFD, 100)
        os.close(cmd_r)
        os.close(resp_w)
        args = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
        ]
        script = f'exec 3<&{hi_r} 4>&{hi_w} {hi_r}<&- {hi_w}>&-; exec "$@"'
        self.proc = subprocess.Popen(["bash", "-c", script, "chromium", *args], pass_fds=(hi_r, hi_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.command("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.command("Page.enable", session=True)
        self.command("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                     deviceScaleFactor=1, mobile=False)

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = os.read(self._resp_r, 1 << 16)
            if not chunk:
                raise CdpError("the browser closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def command(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send a command and wait for its answer (events meanwhile are kept in ``events``).

        Raises
        ------
        CdpError
            When the browser answers with an error.
        """
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise CdpError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            self.events.append(answer)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited).

        Raises
        ------
        CdpError
            When the expression throws.
        """
        result = self.command("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                              returnByValue=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        """Open ``url`` in the page."""
        self.command("Page.navigate", session=True, url=url)

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value.

        Raises
        ------
        CdpError
            On timeout (with the page's address and text).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except CdpError:
                value = None  # the page is navigating
            if value:
                return value
            if time.monotonic() > deadline:
                where = self.evaluate("location.href + '\\n' + (document.body ? document.body.innerText : '')")
                raise CdpError(f"timed out waiting for {expression!r} on {where}")
            time.sleep(0.1)

    def html(self) -> str:
        """The page's DOM as HTML."""
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> None:
        """Save a PNG of the viewport."""
        data = self.command("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def cookies(self) -> list[dict[str, Any]]:
        """Every cookie the browser holds."""
        cookies: list[dict[str, Any]] = self.command("Storage.getCookies")["cookies"]
        return cookies

    def close(self) -> None:
        """Close the browser and the pipe."""
        try:
            self.command("Browser.close")
        except (CdpError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._resp_r)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
