"""``hybrimoe-kt serve`` as a process: SIGTERM during a stream ends the stream with a final chunk and
``[DONE]``, and the process exits 0."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import COMP, NAME, STOCK_RULES, sse_events


def start(model_dir: Path, grace: int) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "hybrimoe_kt.cli", "serve", "--model-path", str(model_dir), "--optimize-config-path",
           str(STOCK_RULES), "--port", "0", "--grace-period", str(grace), "--max-tokens-limit", "400",
           "--model-name", NAME]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 120
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"on http://[\d.]+:(\d+)/v1", line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read() if proc.stderr else ''}")


def stream_then_sigterm(proc: subprocess.Popen, port: int) -> tuple[list[dict[str, Any]], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"prompt": "tell me", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", COMP, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    proc.send_signal(signal.SIGTERM)
    text = first.decode() + resp.read().decode()
    conn.close()
    events = sse_events(text)
    return [json.loads(e) for e in events[:-1]], events[-1]


@pytest.mark.parametrize("grace", [0, 30])
def test_sigterm_during_a_stream(model_dir: Path, grace: int) -> None:
    proc, port = start(model_dir, grace)
    try:
        chunks, last = stream_then_sigterm(proc, port)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert last == "[DONE]"
    usage = chunks.pop()["usage"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    if grace == 0:  # ended at the next step, long before its 400 tokens
        assert usage["completion_tokens"] < 400
    else:  # the grace period let it finish
        assert usage["completion_tokens"] == 400
    out = proc.stdout.read() if proc.stdout else ""
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    assert "server stopped" in out
