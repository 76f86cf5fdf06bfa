"""`bakedllama serve` in a child process, for the tests and `make bench`:

    with ServeProcess(["--device", "golden", "--max-queue", "8"]) as s:
        s.url         # http://127.0.0.1:PORT (a free port, read from the ready line)
        s.metrics()   # {"bakedllama_requests_total{outcome=\"completed\"}": 3.0, ...}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

READY = "bakedllama serve: http://"


class ServeProcess:
    def __init__(self, args=(), *, timeout: float = 120.0, env=None):
        self.args, self.timeout = list(args), timeout
        self.env = dict(os.environ if env is None else env)
        host = str(Path(__file__).resolve().parents[2])  # this tree's host/, not another install's
        self.env["PYTHONPATH"] = os.pathsep.join([host, self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = None
        self.url = None
        self.stderr_lines: list[str] = []

    def __enter__(self):
        cmd = [sys.executable, "-m", "bakedllama.cli", "serve", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        ready = []
        t = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(self.timeout)
        line = ready[0] if ready else ""
        if not line.startswith(READY):
            self.stop()
            raise RuntimeError(f"bakedllama serve did not start within {self.timeout:.0f} s: {line!r}; "
                               f"stderr: {self.stderr()[-2000:]}")
        self.url = line[len("bakedllama serve: "):].split()[0]
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn's graceful shutdown: the device's generation is aborted
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    # HTTP helpers (stdlib only) -----------------------------------------------------------------
    def get(self, path: str, timeout: float = 10.0):
        """(status, body text) of a GET."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def health(self) -> tuple[int, dict]:
        st, body = self.get("/health")
        return st, json.loads(body)

    def metrics(self) -> dict:
        st, body = self.get("/metrics")
        return parse_metrics(body)

    def wait_for(self, pred, timeout: float = 30.0, what: str = "condition", step: float = 0.02):
        """Poll pred(metrics dict) until true; raises TimeoutError with the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if pred(m):
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout:g} s: "
                                   f"{ {k: v for k, v in m.items() if not k.endswith(('_bucket', '_sum'))} }")
            time.sleep(step)


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {"name{labels}": value}; raises ValueError on a malformed line."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if not name:
            raise ValueError(f"malformed metrics line {line!r}")
        out[name] = float(value)
    return out


def outcome(m: dict, k: str) -> float:
    return m[f'bakedllama_requests_total{{outcome="{k}"}}']
