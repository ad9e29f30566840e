"""Helpers shared by the tests that run the command lines as subprocesses."""
import json
import os
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A real checkpoint for the tests that need one: SmolLM2-135M-Instruct as an HF directory (models/ is not in git; CI
# points REAL_MODEL at its copy). Those tests are skipped without it.
REAL_MODEL = os.path.join(REPO, os.environ.get("REAL_MODEL", os.path.join("models", "smollm2-135m-instruct")))
needs_real_model = pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_MODEL, "tokenizer.json")),
                                      reason=f"no checkpoint at {REAL_MODEL} (set REAL_MODEL to an HF directory of "
                                             "SmolLM2-135M-Instruct)")


def logged_steps(out):
    """The steps with a loss in <out>/metrics.jsonl so far (a half-written last line is skipped)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row:
                steps.append(row["step"])
    return steps


def kill_after_step(cmd, out, step, cwd, env=None, timeout=300):
    """Start cmd, SIGKILL it as soon as <out>/metrics.jsonl has logged `step`, and return the steps it logged."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if step in logged_steps(out):
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return logged_steps(out)
