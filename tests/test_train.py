"""train.py and the DACP data: the replay mixture is exact, deterministic and the same for any number of processes;
1 and 2 processes (FSDP2 over gloo) give the same losses; a run killed mid-way resumes to the same losses; token
shards are rebuilt when the text or the tokenizer changes; bad input is a clear error that loses nothing."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import kill_after_step

from data import ReplayMixture, tokenize_corpus
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# The replay mixture


def test_replay_ratio_is_exact_and_carried_over():
    domain = np.arange(0, 5000) % 1000  # domain tokens < 1000
    replay = 1000 + np.arange(0, 7000) % 1000  # replay tokens >= 1000
    for ratio in (0.0, 0.1, 0.25, 0.5, 0.75, 1 / 3, 1.0):
        mix = ReplayMixture(domain, replay, seq_len=8, batch_size=6, replay_ratio=ratio, seed=0)
        n_replay = [int((mix.batch(s)[:, 0] >= 1000).sum()) for s in range(30)]
        for s in range(1, 31):  # after every step, the fraction so far is the ratio, to within one sequence
            assert sum(n_replay[:s]) == math.floor(s * 6 * ratio + 1e-9)


def test_mixture_is_a_pure_function_of_seed_and_step():
    domain, replay = np.arange(4000) % 997, np.arange(6000) % 991
    a = ReplayMixture(domain, replay, seq_len=16, batch_size=8, replay_ratio=0.5, seed=3)
    b = ReplayMixture(domain, replay, seq_len=16, batch_size=8, replay_ratio=0.5, seed=3)
    for step in (7, 0, 123, 7):  # any order: resuming needs only the step
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    c = ReplayMixture(domain, replay, seq_len=16, batch_size=8, replay_ratio=0.5, seed=4)
    assert not np.array_equal(a.batch(0), c.batch(0))


def test_every_window_once_per_epoch():
    tokens = np.arange(8 * 50 + 1)  # exactly 50 windows of 8 (+1 target) tokens
    mix = ReplayMixture(tokens, None, seq_len=8, batch_size=5, replay_ratio=0.0, seed=0)
    starts = np.concatenate([mix.batch(s)[:, 0] for s in range(10)])  # 50 sequences: one epoch
    assert sorted(starts.tolist()) == list(range(0, 400, 8))
    np.testing.assert_array_equal(mix.batch(0)[:, 1:], mix.batch(0)[:, :-1] + 1)  # contiguous windows


def test_micro_batches_cover_the_global_batch_for_any_world_size():
    from parallel import micro_batches_of
    from train import get_args
    args = get_args(["--batch-size", "8", "--micro-batch-size", "2"])
    batch = torch.arange(8)[:, None]
    for world in (1, 2, 4):
        rows = [m for r in range(world) for m in micro_batches_of(batch, args.micro_batch_size, r, world)]
        assert torch.equal(torch.cat(rows), batch)


# -----------------------------------------------------------------------------
# Token shards


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


def test_shard_cache_rebuilds_when_text_or_tokenizer_changes(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "data" / "telco", tmp_path / "telco")
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    a = tokenize_corpus(tok, tmp_path, "telco", "val")
    texts = [open(tmp_path / "telco" / "val" / f, encoding="utf-8").read()
             for f in sorted(os.listdir(tmp_path / "telco" / "val")) if f.endswith(".txt")]
    expected = [i for t in texts if t.strip() for i in tok.encode(t) + [tok.eos_id]]
    assert a.tolist() == expected
    assert tokenize_corpus(tok, tmp_path, "telco", "val").filename == a.filename  # cached
    # the text changes: rebuilt, and the stale cache is gone
    name = sorted(os.listdir(tmp_path / "telco" / "val"))[0]
    with open(tmp_path / "telco" / "val" / name, "a", encoding="utf-8") as f:
        f.write("\nA new sentence about 5G handover.")
    b = tokenize_corpus(tok, tmp_path, "telco", "val")
    assert b.filename != a.filename and len(b) > len(a) and not os.path.exists(a.filename)
    # another tokenizer: rebuilt
    other = Tokenizer.train(texts, vocab_size=400)
    c = tokenize_corpus(other, tmp_path, "telco", "val")
    assert c.filename != b.filename and c.tolist()[:50] == (other.encode(
        open(tmp_path / "telco" / "val" / name, encoding="utf-8").read()) + [other.eos_id])[:50]


def test_jsonl_corpus_and_errors(tmp_path, tiny_run):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    (tmp_path / "fin" / "train").mkdir(parents=True)
    (tmp_path / "fin" / "train" / "a.jsonl").write_text('{"text": "Bonds pay coupons."}\n\n{"text": "APR."}\n')
    assert tokenize_corpus(tok, tmp_path, "fin", "train").tolist() == \
        tok.encode("Bonds pay coupons.") + [tok.eos_id] + tok.encode("APR.") + [tok.eos_id]
    (tmp_path / "fin" / "train" / "b.jsonl").write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: expected a row"):
        tokenize_corpus(tok, tmp_path, "fin", "train")
    (tmp_path / "fin" / "train" / "b.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(ValueError, match=r"b.jsonl:1: not valid JSON"):
        tokenize_corpus(tok, tmp_path, "fin", "train")
    with pytest.raises(ValueError, match=r"unknown domain 'telco'.*domains found in .*: fin"):
        tokenize_corpus(tok, tmp_path, "telco", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty/train/: the corpus is empty"):
        tokenize_corpus(tok, tmp_path, "empty", "train")


# -----------------------------------------------------------------------------
# Training runs (subprocesses: python train.py and torchrun)


def train_cmd(tiny_run, out, *extra, nproc=1):
    args = ["train.py", "--domain", "telco", "--data-root", str(tiny_run / "data"), "--init-from",
            str(tiny_run / "init"), "--out", str(out), "--batch-size", "4", "--micro-batch-size", "1",
            "--seq-len", "32", "--max-steps", "6", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "3",
            "--eval-windows", "4", "--save-every", "2", *extra]
    if nproc == 1:
        return [sys.executable, *args]
    with socket.socket() as s:  # a free port (torchrun's --master_port 0 can hang without a terminal)
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(port), *args]


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


def test_one_and_two_processes_give_the_same_losses(tiny_run, tmp_path):
    """FSDP2 over gloo, gradient accumulation of 4 vs 2 micro-batches: same data, same loss curve. Gradients summed
    instead of averaged (or averaged twice) would change every loss after the first."""
    run_train(train_cmd(tiny_run, tmp_path / "one"))
    run_train(train_cmd(tiny_run, tmp_path / "two", nproc=2))
    one, rows = losses(tmp_path / "one")
    two, rows2 = losses(tmp_path / "two")
    assert list(one) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4, (step, one[step], two[step])
    # Adam hides a gradient scale in the losses, not in the gradient norm: summed-vs-averaged shows here at once
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(rows, rows2) if "grad_norm" in a]
    assert len(norms) == 6 and all(a == pytest.approx(b, rel=1e-3) for a, b in norms), norms
    assert one[6] < one[1]  # it learns
    assert {"val/telco", "bpb/telco", "val/general", "bpb/general"} <= set(rows[0])  # before training
    # each step's peak memory of each process, and the load and export stages' (memory.py)
    assert all(len(r["peak_mb"]) == 2 and min(r["peak_mb"]) > 0 for r in rows2 if "loss" in r)
    with open(tmp_path / "two" / "memory.json") as f:
        stages = json.load(f)
    assert set(stages) == {"load", "export"} and all(len(s["peak_mb"]) == 2 for s in stages.values())
    # the output is an HF directory that transformers loads
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    ours = Transformer.from_pretrained(tmp_path / "two")
    idx = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "two")("5G core")["input_ids"] == \
        Tokenizer.from_pretrained(tmp_path / "two").encode("5G core")


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
    with pytest.raises(AssertionError):  # refused without --resume, nothing overwritten
        run_train(train_cmd(tiny_run, out, "--max-steps", "10"))
    assert losses(out)[0] == done
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
    import re
    p = run_train(train_cmd(tiny_run, tmp_path / "out", *flags), ok=False)
    assert p.returncode != 0
    assert re.search(message, p.stderr + p.stdout), (p.stdout + p.stderr)[-2000:]


def test_documents_are_joined_with_end_of_text_never_an_end_of_turn(tiny_run, tmp_path):
    """doc <|endoftext|> per document (Qwen, SmolLM2), <|begin_of_text|> doc <|end_of_text|> (Llama-3), <s> doc </s>
    (Mistral), even when an Instruct checkpoint's eos is its end-of-turn token (<|im_end|>, <|eot_id|>)."""
    docs = ["The UPF forwards user-plane packets.", "Roaming packs are billed daily.", "x"]
    (tmp_path / "d" / "train").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (tmp_path / "d" / "train" / f"{i}.txt").write_text(doc)
    texts = [open(tiny_run / "data" / "telco" / "train" / f).read() for f in os.listdir(tiny_run / "data" / "telco"
                                                                                        / "train")]
    for specials, begin, end, turn in [(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|endoftext|>",
                                        "<|im_end|>"),
                                       (("<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"), "<|begin_of_text|>",
                                        "<|end_of_text|>", "<|eot_id|>"),
                                       (("</s>", "<s>"), "<s>", "</s>", None)]:
        tok = Tokenizer.train(texts, 400, special_tokens=specials)
        tok.eos_id = tok.special_tokens[turn] if turn else tok.eos_id  # an Instruct checkpoint's eos
        tok.bos_id = tok.special_tokens.get("<|im_start|>")  # (SmolLM2-Instruct lists <|im_start|> as its bos)
        ids = [[tok.special_tokens[begin]] if begin else [] for _ in docs]
        expected = [t for doc, b in zip(docs, ids) for t in b + tok.encode(doc) + [tok.special_tokens[end]]]
        assert tokenize_corpus(tok, tmp_path, "d", "train").tolist() == expected, specials


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
