"""data/heldout, the general evaluation set kept apart from the replay corpus: its multiple-choice file reads with
eval.py's reader, has enough balanced four-way questions, and neither its questions nor its val text repeat the
writing of data/general (the replay corpus in train/, and general/val written alongside it)."""
import os
import re
from collections import Counter

import pytest

from conftest import REPO

import eval as ev

HELDOUT = os.path.join(REPO, "data", "heldout")
GENERAL = os.path.join(REPO, "data", "general")
WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def txt_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".txt"))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def ngrams(text, n=8):
    """The lowercased word n-grams of text, as a set."""
    words = WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def corpus_ngrams(*splits):
    grams = set()
    for split in splits:
        for path in txt_files(os.path.join(GENERAL, split)):
            grams |= ngrams(read(path))
    return grams


ROWS = ev.read_eval_file(os.path.join(HELDOUT, "eval", "mcq.jsonl"), ev.check_mcq)


def test_mcq_rows_are_many_four_way_balanced_and_distinct():
    assert len(ROWS) >= 200
    for r in ROWS:
        assert len(r["choices"]) == 4, r
        assert len({c.lower() for c in r["choices"]}) == 4, r  # no repeated choice
        assert r["question"] == r["question"].rstrip() and not r["question"].endswith("."), r  # a stem to complete
    counts = Counter(r["answer"] for r in ROWS)
    for index in range(4):
        assert 0.15 <= counts[index] / len(ROWS) <= 0.35, counts
    questions = [" ".join(WORD.findall(r["question"].lower())) for r in ROWS]
    assert len(set(questions)) == len(questions), [q for q, n in Counter(questions).items() if n > 1]


def test_mcq_questions_are_not_those_of_the_general_eval():
    general = {r["question"].lower() for r in ev.read_eval_file(os.path.join(GENERAL, "eval", "mcq.jsonl"),
                                                                  ev.check_mcq)}
    assert not [r["question"] for r in ROWS if r["question"].lower() in general]


def test_val_files_are_utf8_prose_named_apart_from_the_general_corpus():
    files = txt_files(os.path.join(HELDOUT, "val"))
    assert len(files) >= 8
    total = sum(len(read(p).encode("utf-8")) for p in files)  # read() also proves the bytes are UTF-8
    assert 25_000 <= total <= 50_000, total
    general_names = {os.path.basename(p) for split in ("train", "val") for p in txt_files(os.path.join(GENERAL, split))}
    assert not {os.path.basename(p) for p in files} & general_names


def test_no_mcq_8gram_appears_in_the_general_corpus():
    """Question and correct answer as the sentence they make: none of its word 8-grams is in general/train or
    general/val."""
    general = corpus_ngrams("train", "val")
    grams = set()
    for r in ROWS:
        grams |= ngrams(r["question"] + " " + r["choices"][r["answer"]])
    assert grams  # the stems are long enough to have 8-grams at all
    shared = grams & general
    assert not shared, sorted(" ".join(g) for g in shared)[:10]


def test_val_text_shares_under_1_percent_of_its_8grams_with_the_replay_corpus():
    train = corpus_ngrams("train")
    grams = set()
    for path in txt_files(os.path.join(HELDOUT, "val")):
        grams |= ngrams(read(path))
    shared = grams & train
    assert len(shared) / len(grams) < 0.01, sorted(" ".join(g) for g in shared)[:10]


def test_an_evaluation_only_domain_has_a_val_split_and_no_train_split():
    """data/heldout has val/ and eval/ only: eval.py reads its val text for bpb; training on it is refused."""
    from data import corpus_files
    assert len(corpus_files(os.path.join(REPO, "data"), "heldout", "val")) == 15
    with pytest.raises(ValueError, match="unknown domain 'heldout'"):
        corpus_files(os.path.join(REPO, "data"), "heldout", "train")
