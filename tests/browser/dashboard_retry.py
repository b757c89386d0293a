#!/usr/bin/env python3
"""Drives headless Chromium through the callcoach dashboard over the DevTools protocol.

Logs in with an API key through the login form, finds the failed job on the dashboard,
clicks its Retry button, reloads until the job shows as succeeded, and saves a screenshot.
Every wait is a bounded poll. Exits non-zero with a message on any failure.

Run by tests/integration/dashboard.rs with the venv Python of deploy/dev.sh (which installs
websocket-client) and Debian's chromium.
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

TIMEOUT_SECS = 60


class Browser:
    """One page of a headless Chromium, spoken to over its DevTools WebSocket."""

    def __init__(self, chromium):
        self.profile = tempfile.mkdtemp(prefix="callcoach-chromium-")
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,1800",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = self._debugging_port()
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=TIMEOUT_SECS, suppress_origin=True
        )
        self.next_id = 0
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _debugging_port(self):
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + TIMEOUT_SECS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                fail(f"chromium exited with status {self.proc.returncode}")
            try:
                with open(path) as f:
                    first = f.readline().strip()
                if first:
                    return int(first)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        fail("chromium did not open its DevTools port")

    def call(self, method, **params):
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def eval(self, expression):
        """The value of a JavaScript expression in the page, or None while it navigates."""
        try:
            result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        except RuntimeError:
            return None
        if "exceptionDetails" in result:
            return None
        return result.get("result", {}).get("value")

    def wait_for(self, expression, what, reload_every=None):
        """Polls until `expression` is truthy (reloading the page every `reload_every` s)."""
        deadline = time.monotonic() + TIMEOUT_SECS
        last_reload = time.monotonic()
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            if reload_every and time.monotonic() - last_reload > reload_every:
                self.call("Page.reload", ignoreCache=True)
                last_reload = time.monotonic()
            time.sleep(0.2)
        text = self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''")
        fail(f"timed out waiting for {what}; page shows:\n{text}")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


def fail(message):
    print(f"dashboard_retry.py: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--base", required=True, help="the front's base URL")
    parser.add_argument("--key", required=True, help="an ops API key")
    parser.add_argument("--job", required=True, help="id of the failed job")
    parser.add_argument("--screenshot", required=True, help="PNG file to write")
    args = parser.parse_args()
    row = f'tr[data-job="{args.job}"]'
    browser = Browser(args.chromium)
    try:
        # A fixed viewport: a headless window can report a width of 0 while a page loads,
        # which the screenshot refuses.
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=1600,
            deviceScaleFactor=1,
            mobile=False,
        )
        browser.call("Page.navigate", url=f"{args.base}/dashboard/login")
        browser.wait_for("document.querySelector('input[name=key]') !== null", "the login form")
        browser.eval(
            f"document.querySelector('input[name=key]').value = {json.dumps(args.key)};"
            "document.querySelector('form[action=\"/dashboard/login\"]').requestSubmit(); true"
        )
        browser.wait_for(
            f"location.pathname === '/dashboard' && "
            f"document.querySelector('{row}[data-status=failed]') !== null",
            "the failed job on the dashboard",
        )
        browser.eval(f"document.querySelector('{row} button[data-action=retry]').click(); true")
        flash = browser.wait_for(
            "location.search.includes('flash=retried') && "
            "document.querySelector('.flash') && document.querySelector('.flash').innerText",
            "the retry's confirmation",
        )
        browser.wait_for(
            f"document.querySelector('{row}[data-status=succeeded]') !== null",
            "the job to show as succeeded",
            reload_every=1.0,
        )
        browser.wait_for(
            "document.readyState === 'complete' && document.documentElement.clientWidth > 0",
            "the page to finish loading",
        )
        shot = browser.call("Page.captureScreenshot", format="png")
        with open(args.screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(json.dumps({"flash": flash}))
    finally:
        browser.close()


if __name__ == "__main__":
    main()
