"""distill.py: each distillation loss equals its formula (and is 0 for identical distributions), 1 - TVD is the
speculative acceptance probability, a few distillation steps bring a tiny student closer to its teacher, and a
student with another tokenizer is refused."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, free_port, kill_after_step
from distill import LOSSES, distillation_loss
from model import IGNORE, ModelConfig, Transformer
from tokenizer import Tokenizer



def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(kind, s_logits, t_logits, mask, T):
    """The formulas, written out with numpy in float64, position by position."""
    values = []
    for s, t in zip(s_logits.reshape(-1, s_logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1])):
        q, p = softmax(s / T), softmax(t / T)
        m = (p + q) / 2
        values.append({"fkl": T ** 2 * np.sum(p * np.log(p / q)), "rkl": np.sum(q * np.log(q / p)),
                       "jsd": 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)),
                       "tvd": 0.5 * np.sum(np.abs(p - q))}[kind])
    values, mask = np.array(values), mask.reshape(-1)
    return (values * mask).sum() / mask.sum()


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_losses_equal_their_formulas(kind, temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2
    mask = torch.rand(2, 5, generator=g) < 0.6
    ours = distillation_loss(s, t, mask, kind, temperature).item()
    expected = reference(kind, s.double().numpy(), t.double().numpy(), mask.double().numpy(), temperature)
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert distillation_loss(t, t, mask, kind, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_padded_vocabulary_is_cut_to_the_shared_ids():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    padded = torch.cat([s, torch.randn(3, 6, generator=g)], -1)  # e.g. Qwen's embedding padded to 64 / 128
    assert distillation_loss(padded, t, kind="fkl").item() == pytest.approx(distillation_loss(s, t).item())


def test_one_minus_tvd_is_the_acceptance_probability():
    """Leviathan et al. Corollary 3.6: P(accept) = sum_x min(p(x), q(x)) = 1 - TVD(p, q)."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(7, 13, generator=g), torch.randn(7, 13, generator=g)
    p, q = t.softmax(-1), s.softmax(-1)
    accept = torch.minimum(p, q).sum(-1).mean()
    assert 1 - distillation_loss(s, t, kind="tvd").item() == pytest.approx(accept.item(), abs=1e-6)


# -----------------------------------------------------------------------------
# distill.py end to end


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small teacher, pretrained for a few steps by train.py on a slice of the telco corpus: its distributions
    have the structure (word frequencies, common continuations) that a new student can pick up in a few steps."""
    root = tmp_path_factory.mktemp("distill")
    src = os.path.join(REPO, "data", "telco")
    for split, n in (("train", 6), ("val", 2)):
        os.makedirs(root / "data" / "telco" / split)
        for f in sorted(os.listdir(os.path.join(src, split)))[:n]:
            (root / "data" / "telco" / split / f).write_text(open(os.path.join(src, split, f)).read())
    texts = [open(root / "data" / "telco" / "train" / f).read() for f in os.listdir(root / "data" / "telco" / "train")]
    tok = Tokenizer.train(texts, 400)
    tok.save_pretrained(root / "tokenizer")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--domain", "telco", "--replay-domain", "telco",
           "--replay-ratio", "0", "--data-root", str(root / "data"), "--init-from", "tiny", "--tokenizer",
           str(root / "tokenizer"), "--out", str(root / "teacher"), "--seq-len", "64", "--batch-size", "8",
           "--micro-batch-size", "8", "--max-steps", "25", "--lr", "3e-3", "--warmup-steps", "3",
           "--eval-every", "0", "--save-every", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, tok


def distill_cmd(root, out, *extra):
    return [sys.executable, os.path.join(REPO, "distill.py"), "--teacher", str(root / "teacher"), "--domain",
           "telco", "--data-root", str(root / "data"), "--out", str(out), "--batch-size", "4",
           "--micro-batch-size", "4", "--seq-len", "64", "--gen-tokens", "16", "--prompt-tokens", "8",
           "--accept-prompts", "2", "--eval-every", "0", "--save-every", "0", *extra]


def run_distill(root, out, *extra):
    return subprocess.run(distill_cmd(root, out, *extra), capture_output=True, text=True, cwd=root, timeout=300)


@pytest.mark.parametrize("data,loss", [("text", "fkl"), ("teacher", "tvd"), ("student", "jsd"),
                                       ("teacher+student", "fkl")])
def test_a_few_steps_lower_tvd_to_the_teacher(teacher, data, loss):
    root, _ = teacher
    out = root / f"draft-{data}"
    result = run_distill(root, out, "--student", "tiny", "--data", data, "--loss", loss, "--max-steps", "10",
                         "--lr", "3e-3", "--warmup-steps", "2", "--gen-temperature", "0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    tvd = [r["tvd/telco"] for r in rows if "tvd/telco" in r]
    assert len(tvd) == 2 and tvd[1] < tvd[0] - 0.02, tvd
    assert "before distillation: acceptance rate" in result.stderr + result.stdout
    assert "after distillation: acceptance rate" in result.stderr + result.stdout
    assert Transformer.from_pretrained(out).config.vocab_size == Tokenizer.from_pretrained(out).n_vocab
    if data == "teacher":  # every stage's peak is recorded, and the whole run's is the highest of them
        stages = json.loads((out / "memory.json").read_text())
        assert {"load teacher", "teacher's held-out paths", "acceptance before", "teacher samples", "export",
                "acceptance after", "whole run"} <= set(stages)
        steps = [r["peak_mb"][0] for r in rows if "peak_mb" in r]
        assert stages["whole run"]["peak_mb"][0] >= max([e["peak_mb"][0] for e in stages.values()] + steps)


def test_two_processes_sample_measure_and_train_as_one(teacher, tmp_path):
    """Under torchrun the teacher is split by heads and vocabulary (parallel.TensorParallelTeacher): the same pool
    of teacher samples (its fingerprint; greedy and sampled, in one order), the same acceptance and the same losses
    as one process, in float32, and each process's whole-run peak recorded."""
    root, _ = teacher
    flags = ["--student", "tiny", "--data", "teacher", "--max-steps", "2", "--micro-batch-size", "2",
             "--gen-temperature", "0,1"]
    one = run_distill(root, tmp_path / "one", *flags)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = distill_cmd(root, tmp_path / "two", *flags)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), *cmd[1:]], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    fingerprints = [re.search(r"fingerprint (\w+)", r.stdout + r.stderr).group(1) for r in (one, two)]
    assert fingerprints[0] == fingerprints[1]
    accept = [json.loads((tmp_path / d / "acceptance.json").read_text()) for d in ("one", "two")]
    for when in ("before", "after"):
        for key in ("acceptance_greedy", "acceptance_T=1"):
            assert accept[1][when][key] == pytest.approx(accept[0][when][key], abs=1e-4), (when, key)
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if "loss" in r]
              for d in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert len(json.loads((tmp_path / "two" / "memory.json").read_text())["whole run"]["peak_mb"]) == 2


def test_student_with_another_tokenizer_is_refused(teacher, tmp_path):
    root, _ = teacher
    other = Tokenizer.train(["completely different words for another vocabulary " * 30], 300)
    torch.manual_seed(0)
    student = Transformer(ModelConfig.from_preset("tiny", vocab_size=other.n_vocab, n_layers=1))
    student.save_pretrained(tmp_path / "student")
    other.save_pretrained(tmp_path / "student")
    result = run_distill(root, tmp_path / "out", "--student", str(tmp_path / "student"), "--max-steps", "1")
    assert result.returncode != 0
    assert "different tokenizers" in result.stderr and "they must share one" in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_killed_and_resumed_run_draws_the_same_teacher_pool(teacher):
    """The teacher's samples (--gen-temperature 1) are drawn under their own seeds: a run killed and resumed
    trains on the same pool, with the same losses, as a run never interrupted (the acceptance measurement that
    only a fresh run makes must not shift the RNG the pool is drawn from)."""
    root, _ = teacher
    flags = ["--student", "tiny", "--data", "teacher", "--gen-temperature", "1", "--max-steps", "12",
             "--save-every", "2", "--lr", "3e-3"]
    fresh = run_distill(root, root / "pool-fresh", *flags)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    logged = kill_after_step(distill_cmd(root, root / "pool-killed", *flags), root / "pool-killed", 3, cwd=root)
    assert 3 <= max(logged) < 12, "the run finished before it could be killed"
    resumed = run_distill(root, root / "pool-killed", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fingerprints = [re.findall(r"teacher pool: \d+ rows, fingerprint (\w+)", r.stdout + r.stderr)
                    for r in (fresh, resumed)]
    assert fingerprints[0] and fingerprints[0] == fingerprints[1]

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    a, b = losses(root / "pool-fresh"), losses(root / "pool-killed")
    assert list(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


@pytest.mark.parametrize("kind", LOSSES)
def test_chunked_distillation_equals_the_formula_even_with_empty_chunks(kind):
    """distill.distilled computes the loss a chunk of positions at a time; with more chunks than distilled
    positions some chunks are empty, and they add 0 (not NaN). Losses and student gradients equal the
    whole-logits formula."""
    from distill import distilled
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=50, max_seq_len=32)
    student, teacher = Transformer(config), Transformer(config)
    for m in (student, teacher):
        m.init_weights()
    ids = torch.randint(0, 50, (2, 12))
    labels = torch.full((2, 12), IGNORE)
    labels[0, 9:] = ids[0, 9:]  # 3 distilled positions in 24, and 24 chunks of one position
    student.loss_chunk_rows = teacher.loss_chunk_rows = 1
    loss = distilled(student, teacher, torch.stack([ids, labels], 1), kind, temperature=2.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    mask = labels != IGNORE
    with torch.no_grad():
        teacher_logits = teacher(ids)
    ref = distillation_loss(student(ids), teacher_logits, mask, kind, 2.0) * mask.sum()
    ref.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_no_acceptance_prompts_measures_no_acceptance_and_finishes(teacher, tmp_path):
    """--accept-prompts 0 records no made-up "before" acceptance of 0.0, and the run finishes."""
    root, _ = teacher
    r = run_distill(root, tmp_path / "d", "--data", "text", "--max-steps", "1", "--accept-prompts", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "d" / "acceptance.json").exists() and (tmp_path / "d" / "complete.json").exists()
    assert "the acceptance rate is not measured" in r.stdout + r.stderr


def test_a_mix_takes_its_sources_in_turn_and_the_teacher_pool_each_temperature(teacher, tmp_path):
    """--data text+teacher --gen-temperature 0,1: even steps distil corpus windows (every position a label), odd
    steps teacher rows (labels on the continuation only); the pool holds one greedy and one sampled continuation
    per prompt, the greedy one the teacher's argmax at every position."""
    import distill
    root, tok = teacher
    args = distill.get_args(["--teacher", str(root / "teacher"), "--data-root", str(root / "data"), "--seq-len",
                             "64", "--gen-tokens", "8", "--prompt-tokens", "8", "--data", "text+teacher",
                             "--gen-temperature", "0,1", "--batch-size", "2"])
    model = Transformer.from_pretrained(root / "teacher").eval()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://localhost:{free_port()}", rank=0, world_size=1)
    try:  # (the corpus is tokenized once per process group)
        pool = distill.teacher_pool(model, tok, args, None, torch.float32, 0, 1)
        n = len(distill.domain_prompts(tok, model, args, "train"))
        text = distill.text_source(tok, args)
    finally:
        torch.distributed.destroy_process_group()
    assert len(pool) == 2 * n
    for ids, labels in pool[:n]:  # greedy: each continuation token is the argmax after the tokens before it
        start = next(i for i, x in enumerate(labels) if x != IGNORE)
        with torch.no_grad():
            argmax = model(torch.tensor([ids]))[0].argmax(-1).tolist()
        assert labels[start:] == argmax[start:len(ids) - 1]
    assert [row[0] for row in pool[:n]] != [row[0] for row in pool[n:]]
    source = distill.mixed([text, distill.pool_source(pool, args, 0)])
    for step in range(4):
        labels = source(step)[:, 1]
        assert ((labels == IGNORE).sum() == 0) == (step % 2 == 0), step


def test_data_mixes_are_named_once_each(capsys):
    import distill
    for bad in ("teacher+teacher", "teacher+students", ""):
        with pytest.raises(SystemExit):
            distill.get_args(["--teacher", "t", "--data", bad])
        assert "expected one of text, sft, teacher, student or a mix" in capsys.readouterr().err


def test_gen_tokens_must_leave_room_for_the_prompt(capsys):
    """--seq-len 64 --gen-tokens 64 trained 96-token rows (a prompt cut to its last 0 tokens is all of it)."""
    import distill
    for gen in ("64", "100"):
        with pytest.raises(SystemExit):
            distill.get_args(["--teacher", "t", "--seq-len", "64", "--gen-tokens", gen])
        assert f"--gen-tokens {gen} must be less than --seq-len 64" in capsys.readouterr().err


def tiny_model(seed=0, vocab_size=64):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                    max_seq_len=64))
    model.init_weights()
    return model.eval()


def test_the_sampling_cache_is_sized_to_the_prompts_not_the_flag():
    """--gen-batch-size 100000 sized a KV cache for 100,000 rows (GBs), kept through training."""
    import argparse
    import distill
    model = tiny_model()
    args = argparse.Namespace(gen_batch_size=100_000, seq_len=32, gen_tokens=8, gen_temperature=1.0)
    rows = distill.sample_rows(model, [[1, 2, 3], [4, 5], [6]], [1, 2, 3], args, eos_id=None, dtype=torch.float32,
                               temperature=1.0)
    assert len(rows) == 3 and model.max_batch_size == 3


def test_a_sharded_teacher_predicts_no_speedup(monkeypatch):
    """Decoding through a teacher sharded over processes times its collectives (c 0.045 against 1.39 in one
    process): the acceptance rates are kept, the cost ratio and predicted speedup are not made up."""
    import argparse
    import distill
    tok = Tokenizer.train(["some words to learn a few merges from " * 10], 300)
    teacher, student = tiny_model(0, 300), tiny_model(1, 300)
    args = argparse.Namespace(seed=0, gen_tokens=4, gamma=2, replicate_teacher=False, gen_batch_size=4, seq_len=16,
                              gen_temperature=1.0)
    paths = distill.held_out_paths(teacher, [[1, 2, 3]], args, None, torch.float32)
    monkeypatch.setattr(distill.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distill.dist, "is_initialized", lambda: True)
    result = distill.acceptance(teacher, student, paths, args, tok.eos_id or 0)
    assert result["cost_ratio"] is None and result["predicted_speedup_greedy"] is None
    assert 0 <= result["acceptance_greedy"] <= 1
    assert "speedup not predicted" in distill.acceptance_line("after", result, 2)


def test_a_bf16_student_is_exported_in_bf16(teacher, tmp_path):
    """An HF student keeps the dtype it is stored in (it was written back as fp32, twice its size)."""
    root, tok = teacher
    student = tmp_path / "student"
    Transformer.from_pretrained(root / "teacher").to(torch.bfloat16).save_pretrained(student)
    tok.save_pretrained(student)
    r = run_distill(root, tmp_path / "d", "--student", str(student), "--student-layers", "1", "--data", "text",
                    "--max-steps", "1", "--accept-prompts", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "d" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_reduced_draft_vocabulary_is_chosen_exported_and_measured(teacher, tmp_path):
    """--draft-vocab K: the export lists the K ids most frequent in the domain corpus plus the teacher's stop token,
    load_draft gives the draft that head, and the acceptance is measured with it before and after."""
    from draft_vocab import DRAFT_VOCAB
    from speculative import load_draft
    root, _ = teacher
    out = tmp_path / "pruned"
    r = run_distill(root, out, "--data", "text", "--max-steps", "2", "--draft-vocab", "60")
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout + r.stderr
    assert "draft vocabulary: " in printed and "after distillation: acceptance rate" in printed
    ids = json.loads(open(out / DRAFT_VOCAB).read())["ids"]
    eos = Transformer.from_pretrained(root / "teacher").config.eos_token_id
    assert 60 <= len(ids) <= 61 and eos in ids and ids == sorted(set(ids))
    draft, _ = load_draft(out, torch.device("cpu"))
    assert draft.vocab_ids.tolist() == ids and draft.lm_head.weight.shape[0] == len(ids)
