"""Corpora as users hold them (data.py): compressed .txt / .jsonl files and parquet tokenise to exactly the tokens of
the same documents as plain files; --text-key names the rows' key, and a row without it is an error naming its file,
line and key; a domain without val/ holds out the documents of a stated content-hash rule, never trained on; a .txt
over the piece size is tokenised piece by piece; a killed tokenisation restarts cleanly. Each is checked against a
reference computed here (the tokenizer's encode of the documents, the hash formula, slicing the text), never against
data.py's own output."""
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, run_train, train_cmd

from data import tokenize_corpus
from tokenizer import Tokenizer

SAMPLE = os.path.join(REPO, "data", "telco", "train")


def sample_docs(n):
    names = sorted(f for f in os.listdir(SAMPLE) if f.endswith(".txt"))[:n]
    return [open(os.path.join(SAMPLE, f), encoding="utf-8").read() for f in names]


def reference(tok, docs):
    """The ids every corpus format must give: each document encoded, followed by end-of-text."""
    return [t for d in docs for t in tok.encode(d) + [tok.eos_id]]


def write(path, text, opener=open):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def held_out(text):
    """The rule docs/training.md states for a domain without val/: 1 in 100 documents by content hash."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100 == 0


# -----------------------------------------------------------------------------
# Formats


def test_compressed_files_and_text_key_give_the_tokens_of_plain_files(tiny_run, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    docs = sample_docs(6)
    docs[3] += "Café: 5G NR in 🇰🇷,\r\nand a Windows line end."
    docs.append(docs[3])
    # the plain layout: a .txt per document and a .jsonl of {"text": ...}
    for i, doc in enumerate(docs[:4]):
        write(tmp_path / "plain" / "train" / f"{i}.txt", doc)
    write(tmp_path / "plain" / "train" / "4.jsonl", jsonl({"text": d} for d in docs[4:]))
    # the same documents compressed three ways, the rows keeping their text under "content"
    for i, opener in enumerate((gzip.open, bz2.open, lzma.open, gzip.open)):
        write(tmp_path / "packed" / "train" / f"{i}.txt{('.gz', '.bz2', '.xz', '.gz')[i]}", docs[i], opener)
    write(tmp_path / "packed" / "train" / "4.jsonl.gz", jsonl({"id": k, "content": d} for k, d in enumerate(docs[4:])),
          gzip.open)
    # a .txt is read with universal newlines (as open() reads it), a JSON string keeps its "\r\n"
    expected = reference(tok, [d.replace("\r\n", "\n") for d in docs[:4]] + docs[4:])
    assert tokenize_corpus(tok, tmp_path, "plain", "train").tolist() == expected
    assert tokenize_corpus(tok, tmp_path, "packed", "train", text_key="content").tolist() == expected


def test_a_row_without_the_text_key_names_file_line_and_key(tiny_run, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    write(tmp_path / "d" / "train" / "rows.jsonl.gz", jsonl([{"content": "Roaming."}, {"body": "Billing."}]),
          gzip.open)
    with pytest.raises(ValueError, match=r'^\S*rows\.jsonl\.gz:2: expected a row \{"content": <string>\} \(the key is '
                                         r'--text-key\)$'):
        tokenize_corpus(tok, tmp_path, "d", "train", text_key="content")
    with pytest.raises(ValueError, match=r"rows\.jsonl\.gz:1: expected a row \{\"text\": <string>\}"):
        tokenize_corpus(tok, tmp_path, "d", "train")  # the default key


def test_a_compressed_file_that_is_not_utf8_names_its_first_bad_byte(tiny_run, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    (tmp_path / "d" / "train").mkdir(parents=True)
    with gzip.open(tmp_path / "d" / "train" / "latin1.txt.gz", "wb") as f:
        f.write(b"x" * 3_000_000 + "café".encode("latin-1"))  # the bad byte past the first 1 MB read
    with pytest.raises(ValueError, match=r"latin1\.txt\.gz: not UTF-8 text \(byte 0xe9 at offset 3000003\)"):
        tokenize_corpus(tok, tmp_path, "d", "train")


def test_parquet_gives_the_tokens_of_the_same_documents_as_jsonl(tiny_run, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    docs = sample_docs(5)
    write(tmp_path / "j" / "train" / "a.jsonl", jsonl({"text": d} for d in docs))
    (tmp_path / "p" / "train").mkdir(parents=True)
    table = pa.table({"url": [f"u{i}" for i in range(5)], "body": docs})
    pq.write_table(table, tmp_path / "p" / "train" / "a.parquet", row_group_size=2)  # 3 row groups
    assert pq.ParquetFile(tmp_path / "p" / "train" / "a.parquet").num_row_groups == 3
    expected = reference(tok, docs)
    assert tokenize_corpus(tok, tmp_path, "j", "train").tolist() == expected
    assert tokenize_corpus(tok, tmp_path, "p", "train", text_key="body").tolist() == expected
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text' \(columns: url, body\)"):
        tokenize_corpus(tok, tmp_path, "p", "train")


def test_parquet_without_pyarrow_is_a_one_line_error(tiny_run, tmp_path, monkeypatch):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    (tmp_path / "p" / "train").mkdir(parents=True)
    (tmp_path / "p" / "train" / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow.parquet now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError) as e:
        tokenize_corpus(tok, tmp_path, "p", "train")
    assert re.fullmatch(r"\S*a\.parquet: reading \.parquet needs pyarrow: pip install pyarrow", str(e.value))


# -----------------------------------------------------------------------------
# A domain without val/


def test_a_domain_without_val_holds_out_documents_by_content_hash(tiny_run, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    docs = [f"Note {i}. " + d for i, d in enumerate(sample_docs(6) * 34)][:200]
    val = [d for d in docs if held_out(d)]
    assert 1 <= len(val) < len(docs)  # (the rule picks some of these: the test exercises it)
    for i, doc in enumerate(docs):
        write(tmp_path / "h" / "train" / f"{i:03d}.txt", doc)
    got_val = tokenize_corpus(tok, tmp_path, "h", "val").tolist()
    got_train = tokenize_corpus(tok, tmp_path, "h", "train", skip_held_out=True).tolist()
    assert got_val == reference(tok, val)
    assert got_train == reference(tok, [d for d in docs if not held_out(d)])  # disjoint, and nothing lost
    # content, not names or order: the same documents as rows of one file, reversed, give the same split
    write(tmp_path / "r" / "train" / "all.jsonl", jsonl({"text": d} for d in docs[::-1]))
    assert tokenize_corpus(tok, tmp_path, "r", "val").tolist() == reference(tok, val[::-1])
    # too few documents for any to hit: the one with the smallest hash (at least one document is held out)
    few = docs[:6]
    assert not any(held_out(d) for d in few)
    for i, doc in enumerate(few):
        write(tmp_path / "few" / "train" / f"{i}.txt", doc)
    smallest = min(few, key=lambda d: hashlib.sha256(d.encode()).digest()[:8])
    assert tokenize_corpus(tok, tmp_path, "few", "val").tolist() == reference(tok, [smallest])
    assert tokenize_corpus(tok, tmp_path, "few", "train", skip_held_out=True).tolist() == \
        reference(tok, [d for d in few if d != smallest])
    # one document cannot be split
    write(tmp_path / "one" / "train" / "a.txt", docs[0])
    with pytest.raises(ValueError, match=r"one/train/: 1 distinct document\(s\), too few to hold out a val split"):
        tokenize_corpus(tok, tmp_path, "one", "val")


def test_train_trains_on_a_compressed_domain_without_val(tiny_run, tmp_path):
    """train.py on a telco domain of .jsonl.gz rows under "content" and a .txt.xz, with no val/: it says it holds a
    val split out, trains, and evaluates on it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_run / "data" / "general", data / "general")
    src = tiny_run / "data" / "telco" / "train"
    docs = [open(src / f, encoding="utf-8").read() for f in sorted(os.listdir(src)) if f.endswith(".txt")]
    write(data / "telco" / "train" / "rows.jsonl.gz", jsonl({"content": d} for d in docs[:-1]), gzip.open)
    write(data / "telco" / "train" / "last.txt.xz", docs[-1], lzma.open)
    p = run_train(train_cmd(tiny_run, tmp_path / "out", "--data-root", str(data), "--text-key", "content",
                            "--max-steps", "3"))
    log = p.stdout + p.stderr
    assert re.search(r"telco/val/: none, so val is 1 document\(s\) held out of train/'s 2 files \(1 in 100 by content "
                     r"hash; train skips them\), [\d,]+ tokens", log), log[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert any("bpb/telco" in r for r in rows) and any("loss" in r for r in rows)
    assert json.load(open(tmp_path / "out" / "run.json"))["text_key"] == "content"


# -----------------------------------------------------------------------------
# Large files: pieces, and a killed tokenisation


def test_a_txt_over_the_piece_size_is_tokenised_piece_by_piece(tiny_run, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    n = 700
    text = "\n\n".join(sample_docs(4)) + "\n" + "no blank line here. " * 80 + "\n\nThe end.\n"
    assert len(text) > 3 * n
    pieces, rest = [], text  # the rule: the next n characters, cut after their last blank line (or at n)
    while len(rest) > n:
        cut = rest[:n].rfind("\n\n")
        cut = cut + 2 if cut >= 0 else n
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    assert any(len(p) == n and "\n\n" not in p for p in pieces)  # (a forced cut is exercised too)
    expected = [t for p in pieces for t in tok.encode(p)] + [tok.eos_id]  # one document: one eos
    write(tmp_path / "d" / "train" / "big.txt", text)
    write(tmp_path / "d" / "train" / "small.txt.gz", "Small file.", gzip.open)
    write(tmp_path / "z" / "train" / "big.txt.bz2", text, bz2.open)
    assert tokenize_corpus(tok, tmp_path, "d", "train", piece_chars=n).tolist() == \
        expected + tok.encode("Small file.") + [tok.eos_id]
    assert tokenize_corpus(tok, tmp_path, "z", "train", piece_chars=n).tolist() == expected
    assert tokenize_corpus(tok, tmp_path, "z", "train").tolist() == reference(tok, [text])  # under 8 M characters: whole


KILLED = textwrap.dedent("""
    import sys
    from data import tokenize_corpus
    from tokenizer import Tokenizer
    tokenize_corpus(Tokenizer.from_pretrained(sys.argv[1]), sys.argv[2], "big", "train", batch_bytes=1 << 14)
""")


def test_a_killed_tokenisation_restarts_cleanly(tiny_run, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_run / "init")
    docs = [f"Document {i}. " + d * 40 for i, d in enumerate(sample_docs(6) * 10)]
    write(tmp_path / "big" / "train" / "all.jsonl.gz", jsonl({"text": d} for d in docs), gzip.open)
    cache = tmp_path / "big" / ".tokens"
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(tiny_run / "init"), str(tmp_path)], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (cache.is_dir() and any(f.endswith(".tmp") for f in os.listdir(cache))):
        time.sleep(0.01)
    time.sleep(0.2)  # part-way through
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [f for f in os.listdir(cache) if f.endswith(".tmp")]
    assert left and not [f for f in os.listdir(cache) if f.endswith(".bin")]  # only a partial temporary
    assert tokenize_corpus(tok, tmp_path, "big", "train").tolist() == reference(tok, docs)
    assert [f for f in os.listdir(cache) if f.endswith(".tmp")] == []  # swept
