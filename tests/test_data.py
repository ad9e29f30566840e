"""data.py's promises: a domain's corpus becomes the token ids of encoding each document with the checkpoint's
tokenizer and framing it with end-of-text (never an Instruct checkpoint's end-of-turn), cached and rebuilt when
the text or the tokenizer changes, safely under concurrent processes, with errors that name the file and line;
the replay mixture takes exactly its ratio, is a pure function of (seed, step) and sees every window once per
epoch; SFT conversations are checked row by row; the curriculum keeps its stages in order with their epochs (or
pools them), and pads without loss."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO, run_train, train_cmd

from data import Curriculum, ReplayMixture, read_conversations, tokenize_corpus
from model import IGNORE
from tokenizer import Tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


# -----------------------------------------------------------------------------
# Corpora and the token cache


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


def test_corpus_files_in_subfolders_are_read(tiny_run, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    (tmp_path / "d" / "train" / "2024" / "q1").mkdir(parents=True)
    (tmp_path / "d" / "train" / "a.txt").write_text("Top level.")
    (tmp_path / "d" / "train" / "2024" / "q1" / "b.txt").write_text("Nested twice.")
    assert tokenize_corpus(tok, tmp_path, "d", "train").tolist() == \
        tok.encode("Nested twice.") + [tok.eos_id] + tok.encode("Top level.") + [tok.eos_id]
    p = run_train(train_cmd(tiny_run, tmp_path / "out", "--max-steps", "1"))
    assert re.search(r"telco/train/: \d+ files, [\d,]+ tokens", p.stdout + p.stderr)


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


CONCURRENT = textwrap.dedent("""
    import sys, time, hashlib
    from data import tokenize_corpus
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(sys.argv[1])
    while time.time() < float(sys.argv[3]):  # start together
        pass
    tokens = tokenize_corpus(tok, sys.argv[2], "big", "train", batch_bytes=1 << 16)
    print(hashlib.sha256(tokens.tobytes()).hexdigest(), len(tokens))
""")


def test_concurrent_tokenisation_gives_every_process_the_whole_corpus(tiny_run, tmp_path):
    """Four processes tokenise the same new corpus at once: each gets, and the cache keeps, exactly the ids of
    encoding each document followed by eos; no reader ever sees a partial file."""
    src = tiny_run / "data" / "telco" / "train"
    docs = [open(src / f, encoding="utf-8").read() for f in sorted(os.listdir(src))]
    (tmp_path / "big" / "train").mkdir(parents=True)
    for i in range(120):  # about 20 MB: a second or two to tokenise, so the writes overlap
        (tmp_path / "big" / "train" / f"{i:03d}.txt").write_text(f"Document {i}. " + docs[i % len(docs)] * 30)
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    texts = [(tmp_path / "big" / "train" / f"{i:03d}.txt").read_text() for i in range(120)]
    expected = np.array([t for text in texts for t in tok.encode(text) + [tok.eos_id]], dtype=np.uint16)
    digest = hashlib.sha256(expected.tobytes()).hexdigest()
    start = time.time() + 3  # staggered: a process starts while another is half-way through its file
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tiny_run / "init"), str(tmp_path),
                               str(start + 0.2 * i)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == [digest, str(len(expected))]
    cached = tokenize_corpus(tok, tmp_path, "big", "train")
    assert hashlib.sha256(np.asarray(cached).tobytes()).hexdigest() == digest
    assert not [f for f in os.listdir(tmp_path / "big" / ".tokens") if f.endswith(".tmp")]


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


# -----------------------------------------------------------------------------
# SFT conversations and the curriculum


def test_bad_conversations_name_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    for row, message in [({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
                         ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
                         ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
                          "content must be a string"),
                         ({"text": "x"}, 'expected a row {"messages"')]:
        path = tmp_path / "stage.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=rf"stage.jsonl:2: .*{message}"):
            read_conversations(path)


def rows(stage, n):
    """Rows whose ids identify their stage and index: ids = [stage, i, ...] of varying length."""
    return [([stage, i, 7] + [7] * (i % 5), [IGNORE] + [i] * (1 + i % 5)) for i in range(n)]


def test_curriculum_keeps_stages_in_order_with_their_epochs():
    stages = [("a", rows(0, 20), 1), ("b", rows(1, 12), 2), ("c", rows(2, 8), 3)]
    cur = Curriculum(stages, batch_size=4, seed=0)
    assert [(n, s) for n, _, s in cur.stages] == [("a", 5), ("b", 6), ("c", 6)]
    seen = {}
    for step in range(len(cur)):
        k, name, _, _ = cur.stage_of(step)
        batch = cur.batch(step)
        assert set(batch[:, 0, 0].tolist()) == {k}  # a batch holds only its own stage's rows
        for i in batch[:, 0, 1].tolist():
            seen[k, i] = seen.get((k, i), 0) + 1
    assert all(seen[0, i] == 1 for i in range(20))
    assert all(seen[1, i] == 2 for i in range(12))
    assert all(seen[2, i] == 3 for i in range(8))


def test_a_fraction_of_an_epoch_trains_that_share_of_the_rows_each_once():
    cur = Curriculum([("a", rows(0, 20), 0.5), ("b", rows(1, 12), 1.5)], batch_size=2, seed=0)
    assert [(n, s) for n, _, s in cur.stages] == [("a", 5), ("b", 9)]
    seen = np.zeros((2, 20), dtype=int)
    for step in range(len(cur)):
        for k, i in cur.batch(step)[:, 0, :2].tolist():
            seen[k, i] += 1
    assert sorted(seen[0]) == [0] * 10 + [1] * 10  # half the rows, none twice
    assert sorted(seen[1, :12]) == [1] * 6 + [2] * 6  # one epoch, then half of a second shuffle


def test_single_stage_pools_the_same_examples():
    stages = [("a", rows(0, 20), 1), ("b", rows(1, 12), 2), ("c", rows(2, 8), 3)]
    cur = Curriculum(stages, batch_size=4, seed=0, single_stage=True)
    assert len(cur.stages) == 1 and len(cur) == 17  # 20 + 24 + 24 = 68 rows
    firsts = [set(cur.batch(s)[:, 0, 0].tolist()) for s in range(len(cur))]
    assert set().union(*firsts[:4]) > {0}  # stages mixed from the start
    counts = np.bincount(np.concatenate([cur.batch(s)[:, 0, 0] for s in range(len(cur))]))
    assert counts.tolist() == [20, 24, 24]


def test_batches_pad_without_loss_and_are_reproducible():
    stages = [("a", rows(0, 30), 2)]
    a, b = Curriculum(stages, 8, seed=3), Curriculum(stages, 8, seed=3)
    for s in range(len(a)):
        assert np.array_equal(a.batch(s), b.batch(s))
        batch = a.batch(s)
        assert a.n_trained[s] == int((batch[:, 1] != IGNORE).sum())
    assert a.padding() < Curriculum(stages, 8, seed=3, pool_batches=1).padding() + 1e-9


def test_a_killed_tokenisations_temporary_file_is_swept(tiny_run, tmp_path):
    """A SIGKILL mid-tokenisation leaves .train-*.bin.<host>-<pid>.*.tmp in the cache; the next tokenisation of that
    domain removes it."""
    shutil.copytree(tiny_run / "data" / "telco", tmp_path / "telco")
    (tmp_path / "telco" / ".tokens").mkdir(exist_ok=True)
    code = f"from files import temporary_name; print(temporary_name({str(tmp_path / 'telco' / '.tokens' / 'train-x.bin')!r}))"
    dead = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True).stdout.strip()
    assert os.path.exists(dead)
    tokenize_corpus(Tokenizer.from_pretrained(tiny_run / "init"), tmp_path, "telco", "train")
    assert not os.path.exists(dead)
