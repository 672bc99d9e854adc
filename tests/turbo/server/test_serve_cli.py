"""`lmc serve` as a process: the startup line, a stop on SIGTERM that lets the in-flight request
finish, and a busy port refused before the model loads."""

from __future__ import annotations

import json
import signal
import socket
import threading

import httpx
from click.testing import CliRunner

from lmcompress.cli.main import cli
from lmcompress.reference import REFERENCE_MODEL_DIR


def test_sigterm_lets_the_in_flight_stream_finish_then_exits_0(start_lmc_server):
    with start_lmc_server() as server:
        assert "as ref-llama; KV cache holds 1024 tokens (64 blocks of 16" in server.log()
        first_chunk, events = threading.Event(), []

        def stream() -> None:
            body = {"prompt": "The king said", "max_tokens": 120, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        events.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60)
        assert server.stop(signal.SIGTERM) == 0
        reader.join(60)
        assert events[-1] == "data: [DONE]"
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finish[-1] == "length" and len(events) - 1 == 120  # every token arrived before the exit
        assert "lmc serve: stopped" in server.log() and "Traceback" not in server.log()


def test_busy_port_fails_fast_with_a_fix():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        outcome = CliRunner().invoke(cli, ["serve", str(REFERENCE_MODEL_DIR), "--port", str(port), "--device", "cpu"])
    assert outcome.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in outcome.output and "--port" in outcome.output
