"""The QA eval sets measure answers to questions the models were not trained on: every row has a question and a
reference, no question is asked twice, none is an SFT conversation's question (train or val, any domain) or a
multiple-choice question, and the telco set's first 68 rows are the ones the earlier results were measured on.

Plain JSON reading, no model: these tests run in a second."""
import glob
import hashlib
import json
import os
import re

import pytest
from conftest import REPO

DATA = os.path.join(REPO, "data")
QA_FILES = sorted(glob.glob(os.path.join(DATA, "*", "eval", "qa.jsonl")))
# The telco set's first 68 rows as docs/results.md's runs scored them (eval.py --limit 68 still scores exactly
# those); newer questions are appended after them, never inserted or edited.
TELCO_FIRST_68_SHA256 = "f64a2ee78cf271d0de8387c0b8a137f589a120abce877b3f4206dd2faadc5528"
# Rows written before this check that reword an SFT question (finance 35 repeats one word for word). They are kept:
# the telco ones are among the 68 that earlier results were measured on. Any other overlap fails.
KNOWN_OVERLAPS = {("telco", 24), ("telco", 36), ("telco", 60), ("finance", 1), ("finance", 9), ("finance", 35)}
# Words too common to tell two questions apart ("what", "my", ...), left out of the near-duplicate measure.
STOP = set("a an and are at be can do does for from get how i if in is it me my of on or should that the there "
           "this to what whats when why will with you your".split())


def domain(path):
    return os.path.basename(os.path.dirname(os.path.dirname(path)))


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def question(row):
    """What the model is asked: the prompt, or the last user turn of a "messages" row."""
    if "prompt" in row:
        return row["prompt"]
    return [m["content"] for m in row["messages"] if m["role"] == "user"][-1]


def normal(text):
    """Lowercase, punctuation stripped, whitespace collapsed: "What's X?" and "whats x" are the same question."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def words(text):
    return set(normal(text).split()) - STOP


def sft_questions():
    """Every user turn of every SFT conversation under data/ (each domain's curriculum and its val/ split)."""
    found = []
    for path in sorted(glob.glob(os.path.join(DATA, "*", "sft", "**", "*.jsonl"), recursive=True)):
        for row in rows(path):
            found += [m["content"] for m in row["messages"] if m["role"] == "user"]
    return found


def test_every_qa_row_has_a_question_and_a_reference():
    assert QA_FILES, "no data/*/eval/qa.jsonl"
    for path in QA_FILES:
        for i, row in enumerate(rows(path), 1):
            assert isinstance(row.get("reference"), str) and row["reference"].strip(), f"{path}:{i}: no reference"
            assert question(row).strip(), f"{path}:{i}: no question"


def test_the_telco_set_is_large_and_keeps_its_first_68_rows():
    path = os.path.join(DATA, "telco", "eval", "qa.jsonl")
    with open(path, "rb") as f:
        lines = f.readlines()
    assert len(lines) >= 300
    assert hashlib.sha256(b"".join(lines[:68])).hexdigest() == TELCO_FIRST_68_SHA256, \
        "the first 68 telco questions changed: earlier results were measured on them (append new rows instead)"


def test_no_question_is_asked_twice():
    seen = {}
    for path in QA_FILES:
        for i, row in enumerate(rows(path), 1):
            key = normal(question(row))
            assert key not in seen, f"{path}:{i} repeats {seen.get(key)}"
            seen[key] = f"{path}:{i}"


def test_no_qa_question_is_a_training_or_mcq_question():
    taken = {normal(q) for q in sft_questions()}
    for path in sorted(glob.glob(os.path.join(DATA, "*", "eval", "mcq.jsonl"))):
        taken |= {normal(row["question"]) for row in rows(path)}
    for path in QA_FILES:
        for i, row in enumerate(rows(path), 1):
            if (domain(path), i) in KNOWN_OVERLAPS:
                continue
            assert normal(question(row)) not in taken, f"{path}:{i}: {question(row)!r} is an SFT or MCQ question"


@pytest.mark.parametrize("path", QA_FILES, ids=lambda p: os.path.relpath(p, DATA))
def test_no_qa_question_closely_rewords_an_sft_question_or_another_one(path):
    """Near duplicates, not just equal strings: a question sharing 75 % of its content words (Jaccard) with an SFT
    question or another QA question is a rewording ("What's the difference between 2.4 GHz and 5 GHz Wi-Fi?" against
    "What is the difference between 2.4 GHz and 5 GHz Wi-Fi?" shares all of them)."""
    mine = [words(question(row)) for row in rows(path)]
    others = [(words(q), q) for q in sft_questions()]
    others += [(words(question(row)), question(row)) for p in QA_FILES if p != path for row in rows(p)]
    for i, a in enumerate(mine):
        if (domain(path), i + 1) in KNOWN_OVERLAPS:
            continue
        near = [q for b, q in others + [(b, f"row {j + 1}") for j, b in enumerate(mine) if j != i]
                if a and b and len(a & b) / len(a | b) >= 0.75]
        assert not near, f"{path}:{i + 1} closely rewords {near[0]!r}"
