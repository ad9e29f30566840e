"""Helpers shared by the tests that run the command lines as subprocesses."""
import json
import os
import signal
import subprocess
import time


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
