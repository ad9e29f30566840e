"""train.py: the global batch is split over any number of processes; 1 and 2 processes (FSDP2 over gloo) train
the same model and each writes what it promises (metrics, memory, an HF export that transformers loads); a run
killed mid-way resumes to the same losses; bad input is a clear error that loses nothing; a diverged loss stops
before the optimizer step; the LR warms up and decays. (The corpus and the replay mixture: tests/test_data.py.)"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import REPO, kill_after_step, losses, run_train, train_cmd

from model import Transformer
from tokenizer import Tokenizer


def test_micro_batches_cover_the_global_batch_for_any_world_size():
    from parallel import micro_batches_of
    from train import get_args
    args = get_args(["--batch-size", "8", "--micro-batch-size", "2"])
    batch = torch.arange(8)[:, None]
    for world in (1, 2, 4):
        rows = [m for r in range(world) for m in micro_batches_of(batch, args.micro_batch_size, r, world)]
        assert torch.equal(torch.cat(rows), batch)


# -----------------------------------------------------------------------------
# One process against two (subprocesses: python train.py and torchrun), the same six steps


@pytest.fixture(scope="module")
def one_and_two(tiny_run, tmp_path_factory):
    """The same run in one process (4 micro-batches of gradient accumulation) and in two (2 each): their output
    directories and metrics rows."""
    root = tmp_path_factory.mktemp("one_and_two")
    run_train(train_cmd(tiny_run, root / "one"))
    run_train(train_cmd(tiny_run, root / "two", nproc=2))
    return {n: (root / n, *losses(root / n)) for n in ("one", "two")}


def test_one_and_two_processes_give_the_same_losses(one_and_two):
    """Same data, same loss curve: the loss is divided by the global number of trained tokens, whatever the split.
    Gradients summed instead of averaged (or averaged twice) would change every loss after the first."""
    (_, one, _), (_, two, _) = one_and_two["one"], one_and_two["two"]
    assert list(one) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4, (step, one[step], two[step])


def test_one_and_two_processes_give_the_same_gradient_norms(one_and_two):
    """Adam hides a gradient scale in the losses, not in the gradient norm: summed-vs-averaged shows here at once."""
    rows, rows2 = one_and_two["one"][2], one_and_two["two"][2]
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(rows, rows2) if "grad_norm" in a]
    assert len(norms) == 6 and all(a == pytest.approx(b, rel=1e-3) for a, b in norms), norms


def test_the_run_learns(one_and_two):
    """Equal losses in 1 and 2 processes would also hold for a run that never updates: the loss must fall."""
    one = one_and_two["one"][1]
    assert one[6] < one[1]


def test_validation_runs_before_the_first_step(one_and_two):
    """metrics.jsonl's first row (step 0) holds each domain's val loss and bits per byte before training."""
    assert {"val/telco", "bpb/telco", "val/general", "bpb/general"} <= set(one_and_two["one"][2][0])


def test_each_step_records_the_peak_memory_of_every_process(one_and_two):
    """FSDP2 shards unevenly, so one process's peak is not the others': every step logs one peak per process."""
    assert all(len(r["peak_mb"]) == 2 and min(r["peak_mb"]) > 0 for r in one_and_two["two"][2] if "loss" in r)


def test_memory_json_has_the_load_and_export_stages_of_every_process(one_and_two):
    """Loading and exporting are stages outside the training steps, with peaks of their own: memory.json records
    each one's peak for every process, and the whole run's, the highest of all (the run's closing memory table is
    read from it)."""
    with open(one_and_two["two"][0] / "memory.json") as f:
        stages = json.load(f)
    assert set(stages) == {"load", "export", "whole run"} and all(len(s["peak_mb"]) == 2 for s in stages.values())
    steps = [r["peak_mb"] for r in one_and_two["two"][2] if "peak_mb" in r]
    for rank in (0, 1):
        assert stages["whole run"]["peak_mb"][rank] >= max([s["peak_mb"][rank] for s in stages.values()] +
                                                           [s[rank] for s in steps])


def test_the_export_loads_in_transformers_with_the_same_logits(one_and_two):
    """The export of a sharded run is gathered from both processes: transformers must read it as the model we
    trained (a missing or misplaced shard changes the logits)."""
    out = one_and_two["two"][0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ours = Transformer.from_pretrained(out)
    idx = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=0)


def test_the_exported_tokenizer_gives_transformers_ids(one_and_two):
    """An exported model is only usable with its tokenizer: transformers' AutoTokenizer must give our ids."""
    out = one_and_two["two"][0]
    assert transformers.AutoTokenizer.from_pretrained(out)("5G core")["input_ids"] == \
        Tokenizer.from_pretrained(out).encode("5G core")


# -----------------------------------------------------------------------------
# Resume, bad input, divergence


def test_resume_after_sigkill_reproduces_the_losses(tiny_run, tmp_path):
    run_train(train_cmd(tiny_run, tmp_path / "full", "--max-steps", "10"))
    full, _ = losses(tmp_path / "full")
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    # killed as soon as step 5 is logged (checkpoint 4 is then complete)
    kill_after_step(train_cmd(tiny_run, out, "--max-steps", "10"), out, 5, cwd=REPO, env=env)
    done, _ = losses(out)
    assert max(done) < 10, "the run finished before it could be killed"
    # an interrupted save looks like this; it must be ignored
    (out / "checkpoints" / "step_000099.tmp").mkdir()
    refused = run_train(train_cmd(tiny_run, out, "--max-steps", "10"), ok=False)  # without --resume
    assert refused.returncode != 0
    assert "already holds a run: pass --resume" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    assert losses(out)[0] == done  # nothing overwritten
    run_train(train_cmd(tiny_run, out, "--max-steps", "10", "--resume"))
    resumed, _ = losses(out)
    assert list(resumed) == list(range(1, 11))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


@pytest.mark.parametrize("flags, message", [
    (["--domain", "legal"], "unknown domain 'legal'"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the model's context"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "--batch-size 6 must be a multiple of --micro-batch-size 4"),
    (["--lr", "1e12", "--save-every", "1", "--grad-clip", "1e30"], "at step .*: stopping; the last good checkpoint"),
])
def test_bad_input_is_a_clear_error(tiny_run, tmp_path, flags, message):
    p = run_train(train_cmd(tiny_run, tmp_path / "out", *flags), ok=False)
    assert p.returncode != 0
    assert re.search(message, p.stderr + p.stdout), (p.stdout + p.stderr)[-2000:]


LOOP_SCRIPT = r"""
import math, sys, tempfile, torch
import train
from model import ModelConfig, Transformer
from parallel import setup_distributed, shard_model
rank, world, device = setup_distributed()
torch.manual_seed(0)
model = Transformer(ModelConfig.from_preset("tiny", vocab_size=64, n_layers=1))
model.init_weights()
model = shard_model(model, device, torch.float32)
optimizer = train.make_optimizer(model, 0.0, device)
windows = torch.randint(0, 64, (2, 9))
batch = torch.stack((windows[:, :-1], windows[:, 1:]), 1)
def loss_fn(model, micro):  # finite at step 1, NaN at step 2
    loss = train.next_token_loss(model, micro)
    return loss if optimizer.state_dict()["state"] == {} else loss * math.nan
schedule = train.Schedule(max_steps=3, lr_fn=lambda step: 1e-2, grad_clip=1.0)
snapshot = {}
def get_step(step):
    snapshot.update({k: v.full_tensor().clone() for k, v in model.state_dict().items()})
    return train.Step([batch], n_trained=16, flops=0)
try:
    train.train_loop(model, optimizer, get_step, loss_fn, schedule, tempfile.mkdtemp(), device=device)
except FloatingPointError as e:
    assert "loss is nan at step 2" in str(e), e
    after = {k: v.full_tensor() for k, v in model.state_dict().items()}
    assert all(torch.equal(snapshot[k], after[k]) for k in after), "a NaN step changed the weights"
    print("stopped before the step")
"""


def test_a_diverged_loss_stops_before_the_optimizer_step(tmp_path):
    """train_loop checks the loss before optimizer.step(): the weights stay those of the last good step."""
    p = subprocess.run([sys.executable, "-c", LOOP_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode == 0 and "stopped before the step" in p.stdout, p.stdout + p.stderr[-3000:]


def test_cosine_lr_warms_up_then_decays_to_min_lr():
    from train import cosine_lr
    lrs = [cosine_lr(s, 1.0, 0.1, 4, 20) for s in range(24)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[12] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 8 / 16)))
    assert lrs[20:] == [pytest.approx(0.1)] * 4
