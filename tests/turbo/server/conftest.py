"""A real `lmc serve` process on a free loopback port, for the server tests.

    @pytest.fixture(scope="module")
    def server(start_lmc_server):
        with start_lmc_server("--api-key", "k") as server:
            yield server          # server.url, server.metrics(), server.process, server.log()
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lmcompress.reference import REFERENCE_MODEL_DIR

DEVICE = os.environ.get("LMC_TEST_DEVICE", "cpu")
# A small pool (64 blocks of 16 tokens) keeps the CPU runs fast and makes block accounting visible.
ENGINE_ARGS = ("--device", DEVICE, "--block-size", "16", "--num-kv-blocks", "64", "--max-model-len", "1024")
STARTUP_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    log_path: Path
    url: str = ""
    api_key: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **options) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **options)

    def metrics(self) -> dict[str, float]:
        """The unlabelled-by-bucket `lmc:` samples of /metrics: {name: value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        samples = {}
        for line in text.splitlines():
            if line.startswith("lmc:") and "_bucket{" not in line:
                samples[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        return samples

    def wait_idle(self, timeout_s: float = 30) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and every KV block is free; returns the metrics."""
        deadline = time.monotonic() + timeout_s
        while True:
            metrics = self.metrics()
            idle = (metrics["lmc:num_requests_running"] == 0 and metrics["lmc:num_requests_waiting"] == 0
                    and metrics["lmc:kv_cache_num_free_blocks"] == metrics["lmc:kv_cache_num_blocks"])
            if idle or time.monotonic() > deadline:
                return metrics
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        return self.process.returncode


def _wait_ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"lmc serve exited with {server.process.returncode}:\n{server.log()}")
        found = _LISTENING.search(server.log())
        if found:
            server.url = found.group(1)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    return
        time.sleep(0.2)
    raise AssertionError(f"lmc serve did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log()}")


@contextlib.contextmanager
def _lmc_server(*args: str, api_key: str | None = None) -> Iterator[ServerProcess]:
    """Run `lmc serve REFERENCE_MODEL --port 0 ...` until the block ends (SIGINT, then kill if stuck)."""
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        key_args = ("--api-key", api_key) if api_key else ()
        command = [sys.executable, "-c", "from lmcompress.cli.main import cli; cli(prog_name='lmc')", "serve",
                   str(REFERENCE_MODEL_DIR), "--host", "127.0.0.1", "--port", "0", "--no-access-log",
                   *ENGINE_ARGS, *key_args, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # leave the second core to the test's clients
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = ServerProcess(process, log_path, api_key=api_key)
        try:
            _wait_ready(server)
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def start_lmc_server():
    return _lmc_server
