"""A real ComfyUI server for the checks in scripts/: main.py of a ComfyUI checkout, with a throwaway base
directory, on 127.0.0.1, asked over HTTP (readiness, prompts and their /history), then stopped.

Used by check_workflows_in_browser.py and check_impact_pack.py (run as `python scripts/<name>.py`, so this
folder is on sys.path). Standard library only: the scripts run it in any Python, ComfyUI in --python.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def logger(tag: str) -> Callable[[str], None]:
    """A log function printing "[tag HH:MM:SS] message" lines."""
    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data=None, timeout: float = 30):
    """(status, headers, body bytes) of a GET, or a POST of JSON when data is given."""
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def http_json(url: str, data=None, timeout: float = 30):
    """The JSON answer of a GET (or a POST of data); RuntimeError with ComfyUI's message unless HTTP 200."""
    status, _, body = http(url, data, timeout)
    if status != 200:
        raise RuntimeError(f"{url}: HTTP {status}: {body[:2000].decode(errors='replace')}")
    return json.loads(body)


class Server:
    """ComfyUI's main.py (--cpu) run by `python` on 127.0.0.1 at `port` (0: a free one) with `base` as its
    --base-directory, in a session of its own, its output in log_path. extra_args: more main.py arguments;
    env: more environment variables. Bytecode goes into the base, so none is written into the ComfyUI
    checkout or the custom nodes."""

    def __init__(self, comfyui: Path, python: str, base: Path, log_path: Path, *, log: Callable[[str], None],
                 port: int = 0, extra_args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{port or free_port()}"
        cmd = [python, str(comfyui / "main.py"), "--base-directory", str(base), "--listen", "127.0.0.1",
               "--port", self.url.rsplit(":", 1)[1], "--cpu", "--disable-auto-launch", *extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPYCACHEPREFIX=str(base / "pycache"), **(env or {}))
        self.log_path = log_path
        self.log_file = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        log(f"starting ComfyUI: {' '.join(cmd)}")
        self.proc = subprocess.Popen(cmd, cwd=comfyui, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}")

    def wait_ready(self, path: str, timeout: float):
        """Wait until GET path (e.g. /system_stats) answers: its JSON."""
        end = time.time() + timeout
        while time.time() < end:
            self.check_running()
            try:
                return http_json(self.url + path, timeout=30)
            except (OSError, RuntimeError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; see {self.log_path}")

    def wait_for_history(self, prompt_id: str, timeout: float) -> dict:
        """The /history entry of a queued prompt, once it has finished (success or error)."""
        end = time.time() + timeout
        while time.time() < end:
            self.check_running()
            entry = http_json(f"{self.url}/history/{prompt_id}").get(prompt_id, {})
            if entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(2)
        raise TimeoutError(f"prompt {prompt_id} not finished within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue an API prompt and wait for it: its /history entry."""
        return self.wait_for_history(http_json(self.url + "/prompt", {"prompt": prompt})["prompt_id"], timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; closes the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
