"""Helpers shared by the tests: the repository root, a free port, randomized weights (randomize), the bytes autograd
saves (saved_bytes), a tiny data root and checkpoint (tiny_run), and the command lines run as subprocesses."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from model import ModelConfig, Transformer
from tokenizer import Tokenizer

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


def free_port():
    """A free TCP port for torchrun's --master_port (its --master_port 0 can hang without a terminal)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def randomize(model, seed=0):
    """Every parameter random, norms included, so no weight can be silently ignored or misplaced."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if "norm" in name else 0.0
            p.copy_(mean + 0.2 * torch.randn(p.shape, generator=g))


# -----------------------------------------------------------------------------
# A tiny DACP setup, and train.py run as a subprocess


def write_domain(root, domain, n_docs, jsonl=False, seed=0):
    """A tiny corpus from the repo's own sample data."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        src = os.path.join(REPO, "data", domain, split)
        names = sorted(f for f in os.listdir(src) if f.endswith(".txt"))
        os.makedirs(os.path.join(root, domain, split), exist_ok=True)
        for name in rng.choice(names, size=min(n_docs, len(names)), replace=False):
            shutil.copy(os.path.join(src, name), os.path.join(root, domain, split, name))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A data root with small telco and general corpora, and a tiny random HF checkpoint with its tokenizer."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    write_domain(data, "telco", 6)
    write_domain(data, "general", 6, seed=1)
    texts = [open(os.path.join(d, f), encoding="utf-8").read() for d in (data / "telco" / "train",
                                                                       data / "general" / "train")
             for f in sorted(os.listdir(d))]
    tok = Tokenizer.train(texts, vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.n_vocab, n_layers=2))
    model.init_weights()
    model.save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    return root


def train_cmd(tiny_run, out, *extra, nproc=1):
    args = ["train.py", "--domain", "telco", "--data-root", str(tiny_run / "data"), "--init-from",
            str(tiny_run / "init"), "--out", str(out), "--batch-size", "4", "--micro-batch-size", "1",
            "--seq-len", "32", "--max-steps", "6", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "3",
            "--eval-windows", "4", "--save-every", "2", *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args]


def run_train(cmd, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, rows


def saved_bytes(model, idx):
    """Bytes of the distinct tensors autograd saves in model's forward over idx (views counted once, weights not)."""
    weights = {id(p) for p in model.parameters()}
    saved = {}

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in weights:
            saved[id(base)] = base.numel() * base.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden(idx)
    return sum(saved.values())
