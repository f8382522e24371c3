"""`loraq serve` as a command: SIGTERM lets requests in flight finish and exits 0; mistakes are one line, exit 2."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`loraq serve ARGS --port 0` in a child process, and its URL once the model is loaded."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "loraq", "serve", *args, "--port", "0"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        found = re.search(r"serving .* at (http://\S+)/v1", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, found.group(1)
        assert time.monotonic() < deadline, "the server did not come up"
    raise AssertionError(f"loraq serve exited {proc.wait()} before serving")


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(tiny_llama_dir):
    proc, url = start(["--model", str(tiny_llama_dir), "--dtype", "fp32"])
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            name = http.get("/v1/models").json()["data"][0]["id"]
            body = {"model": name, "prompt": "a", "max_tokens": 200, "temperature": 0}
            answers = []
            asking = threading.Thread(target=lambda: answers.append(http.post("/v1/completions", json=body)))
            asking.start()
            for _ in range(400):  # until its row is decoding
                if re.search(r"^loraq_batch_rows 1\.0", http.get("/metrics").text, re.M):
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            asking.join(120)
        assert proc.wait(60) == 0
        (answer,) = answers
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] > 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        proc.kill()


@pytest.mark.parametrize("args, says", [
    (["--adapter", "noequals"], "--adapter 'noequals': give NAME=PATH"),
    (["--adapter", "x=/no/such/folder"], "does not exist"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--adapters-dir", "/no/such/dir"], "--adapters-dir /no/such/dir: not a folder"),
])
def test_mistakes_are_one_line_and_exit_2(tiny_llama_dir, args, says):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "loraq", "serve", "--model", str(tiny_llama_dir), "--port", "0",
                           *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("loraq: error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
