"""eval.py against the references: BLEU-4 equals sacrebleu's corpus BLEU, ROUGE-1 equals rouge_score (and counts
CJK characters), multiple-choice log-likelihoods equal a direct computation with the transformers model, and the
command line writes one side-by-side report with general retention."""
import json
import os
import shutil

import pytest
import sacrebleu
import torch
import transformers
from rouge_score import rouge_scorer

from conftest import REPO

import eval as ev
from model import Transformer
from tokenizer import Tokenizer


HYPS = [
    "The cat sat on the mat.",
    "A 5G core uses service-based interfaces, e.g. HTTP/2 & JSON.",
    "It costs $3.50 per GB; 1,000 users pay 3-4 times more.",
    "no overlap at all",
    "VoLTE calls go over IMS!",
    "",
    "Roaming zones: EU, US and \"rest of world\" (ROW).",
    "Line one-\nline two &amp; three &lt;4&gt;",
]
REFS = [
    "The cat is sitting on the mat.",
    "The 5G core (5GC) uses service based interfaces over HTTP/2 with JSON.",
    "It costs $3.50 per gigabyte; 1,000 users pay 3-4 times as much.",
    "something else entirely",
    "VoLTE calls are carried by the IMS core.",
    "An empty answer still counts towards the reference length.",
    "Roaming zones are the EU, the US and the rest of the world.",
    "Line two & three <4>",
]


@pytest.mark.parametrize("n", [1, 2, 3, len(HYPS)])
def test_bleu4_equals_sacrebleu(n):
    hyps, refs = HYPS[:n], REFS[:n]
    assert ev.bleu4(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)


def test_bleu4_edge_cases_equal_sacrebleu():
    for hyps, refs in [(["a b"], ["a b c d e"]), ([""], ["a b"]), (["x y z w v"], ["x y z w v"]),
                       (["one two three four five six"], ["one two three four five seven"]),
                       (["tiny"], ["tiny"]), (["3.14 - 2,5 x-ray 10-20"], ["3.14 - 2,5 x-ray 10-20 ok"])]:
        assert ev.bleu4(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)


def test_rouge1_equals_rouge_score_on_english():
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    expected = 100 * sum(scorer.score(r, h)["rouge1"].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
    assert ev.rouge1(HYPS, REFS) == pytest.approx(expected, abs=1e-9)


def test_rouge1_counts_cjk_characters():
    # hyp 전화 요금제 -> 전 화 요 금 제 (5 tokens); ref 요금제 변경 -> 요 금 제 변 경 (5); overlap 3: F1 = 0.6
    assert ev.rouge1(["전화 요금제"], ["요금제 변경"]) == pytest.approx(60.0)
    # Chinese: hyp 电信网络 (4), ref 电信网 (3): P = 3/4, R = 1, F1 = 6/7; mixed with English tokens
    assert ev.rouge1(["电信网络"], ["电信网"]) == pytest.approx(100 * 6 / 7)
    assert ev.rouge1(["5G 网络 ok"], ["5g 网"]) == pytest.approx(100 * 2 * (2 / 4) * 1 / (2 / 4 + 1))


# -----------------------------------------------------------------------------
# Multiple choice

MCQ = [
    {"question": "The network element that authenticates subscribers in LTE is the",
     "choices": ["MME", "eNodeB", "PGW", "billing system"], "answer": 0},
    {"question": "A prepaid customer whose balance runs out", "choices": ["keeps full service",
     "loses data until a top-up", "is ported away"], "answer": 1},
    {"question": "Question: What does VoLTE carry?\nAnswer:", "choices": ["voice over LTE", "fax", "TV"],
     "answer": 0},
    {"question": "Trailing spaces move to the continuation   ", "choices": ["yes", "no"], "answer": 0},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained tokenizer and a tiny random Llama checkpoint over it (transformers writes the weights)."""
    path = tmp_path_factory.mktemp("ckpt")
    texts = [open(os.path.join(REPO, "data", "telco", "train", f), encoding="utf-8").read()
             for f in sorted(os.listdir(os.path.join(REPO, "data", "telco", "train")))[:12]]
    tok = Tokenizer.train(texts, 400)
    config = transformers.LlamaConfig(vocab_size=tok.n_vocab, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      eos_token_id=tok.eos_id, bos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(("norm" in name) + 0.3 * torch.randn(p.shape))
    hf.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path, hf


def test_encode_pair_matches_hf_tokenizer(checkpoint):
    path, _ = checkpoint
    tok, hf_tok = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    for row in MCQ:
        for choice in row["choices"]:
            ctx, cont = ev.encode_pair(tok, row["question"], " " + choice)
            context = row["question"].rstrip()  # lm-eval moves trailing spaces into the continuation
            whole = hf_tok(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            assert ctx == hf_tok(context, add_special_tokens=False)["input_ids"]
            assert ctx + cont == whole


def test_multiple_choice_equals_direct_loglikelihoods(checkpoint):
    path, hf = checkpoint
    tok, hf_tok = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    model = Transformer.from_pretrained(path).eval()
    pairs, direct = [], []
    for row in MCQ:
        for choice in row["choices"]:
            pairs.append(ev.encode_pair(tok, row["question"], " " + choice))
            ctx = hf_tok(row["question"].rstrip(), add_special_tokens=False)["input_ids"]
            whole = hf_tok(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = hf(torch.tensor([whole])).logits[0].log_softmax(-1)
            direct.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    ours = ev.loglikelihoods(model, pairs, batch_size=3)  # batches mix lengths: padding must not leak
    assert ours == pytest.approx(direct, abs=1e-4)
    scores = iter(direct)
    acc = acc_norm = 0
    for row in MCQ:
        ll = [next(scores) for _ in row["choices"]]
        acc += ll.index(max(ll)) == row["answer"]
        normed = [x / len(c) for x, c in zip(ll, row["choices"])]
        acc_norm += normed.index(max(normed)) == row["answer"]
    assert ev.multiple_choice(model, tok, MCQ) == {"acc": acc / len(MCQ), "acc_norm": acc_norm / len(MCQ)}


def test_batched_qa_answers_equal_transformers_greedy_one_at_a_time(checkpoint):
    """QA answers several questions per forward pass (left-padded, questions of different lengths in one batch):
    each answer is transformers' greedy continuation of that question alone."""
    path, hf = checkpoint
    tok, model = Tokenizer.from_pretrained(path), Transformer.from_pretrained(path).eval()
    rows = [{"prompt": q, "reference": "x"} for q in ("What is VoLTE?", "Name the node that pages an idle phone "
            "in LTE, and say why", "MME?", "How does a prepaid balance run out?", "IMS")]
    _, hyps = ev.qa(model, tok, rows, 10, batch_size=3)
    for row, hyp in zip(rows, hyps):
        ids = ev.qa_prompt(model, tok, row)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
        assert hyp == ev.answer_text(model, tok, out[0, len(ids):].tolist())


# -----------------------------------------------------------------------------
# The command line


def write_data(root):
    for domain in ("telco", "general"):
        for split in ("train", "val"):
            src = os.path.join(REPO, "data", domain, split)
            os.makedirs(root / domain / split)
            for f in sorted(os.listdir(src))[:2]:
                shutil.copy(os.path.join(src, f), root / domain / split / f)
        os.makedirs(root / domain / "eval")
        (root / domain / "eval" / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MCQ))
    (root / "telco" / "eval" / "qa.jsonl").write_text(
        json.dumps({"prompt": "What is VoLTE?", "reference": "Voice over LTE, carried by IMS."}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "What is an MME?"}],
                      "reference": "The LTE core's control-plane node."}) + "\n")


def test_cli_report_with_retention(checkpoint, tmp_path):
    path, _ = checkpoint
    chat = tmp_path / "chat"  # the same weights declared a chat model: it stops at <|im_end|>
    shutil.copytree(path, chat)
    config = json.loads((chat / "config.json").read_text())
    tok = Tokenizer.from_pretrained(path)
    config["eos_token_id"] = [tok.eos_id, tok.special_tokens["<|im_end|>"]]
    (chat / "config.json").write_text(json.dumps(config))
    write_data(tmp_path / "data")
    out = tmp_path / "report"
    ev.main([str(path), str(chat), "--domain", "telco", "--data-root", str(tmp_path / "data"),
             "--max-new-tokens", "8", "--out", str(out), "--draft", str(path)])
    report = json.loads(out.with_suffix(".json").read_text())
    base, adapted = report["metrics"][str(path)], report["metrics"][str(chat)]
    assert base["retention_bpb/general"] == 1.0 and base["retention_mcq/general"] == 1.0
    assert adapted["bpb/telco"] == pytest.approx(base["bpb/telco"])  # same weights, same bpb
    assert {"bpb/telco", "ppl/telco", "mcq_acc/telco", "mcq_acc_norm/telco", "rouge1/telco", "bleu4/telco",
            "bpb/general", "mcq_acc_norm/general"} <= set(base)
    assert base["acceptance_rate/telco"] == 1.0  # the draft is the model itself
    assert "telco: ROUGE-1" in out.with_suffix(".md").read_text()
    # the chat model's prompt is chat-rendered; the base model's is plain text
    model = Transformer.from_pretrained(chat)
    assert ev.qa_prompt(model, tok, {"prompt": "hi"})[-3:] == tok.encode("assistant\n")[-3:]


def test_retention_on_several_general_sets_one_of_them_evaluation_only(checkpoint, tmp_path):
    """--general general,heldout: retention on the replay corpus's own writing and on a held-out set that has no
    train/ split (data/heldout's layout), side by side."""
    path, _ = checkpoint
    write_data(tmp_path / "data")
    held = tmp_path / "data" / "heldout"
    shutil.copytree(os.path.join(REPO, "data", "heldout", "val"), held / "val")
    os.makedirs(held / "eval")
    (held / "eval" / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MCQ))
    out = tmp_path / "report"
    same = tmp_path / "same"  # the same weights again (one path twice is refused)
    shutil.copytree(path, same)
    ev.main([str(path), str(same), "--domain", "telco", "--general", "general,heldout", "--data-root",
             str(tmp_path / "data"), "--max-new-tokens", "4", "--out", str(out)])
    metrics = json.loads(out.with_suffix(".json").read_text())["metrics"][str(same)]
    for general in ("general", "heldout"):
        assert metrics[f"retention_bpb/{general}"] == 1.0 and metrics[f"retention_mcq/{general}"] == 1.0
    assert "heldout: general retention, bpb" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "choices": ["a", "b"]}', r"mcq.jsonl:2: \"answer\" must be an index"),
    ('{"question": "q", "choices": "ab", "answer": 0}', r"mcq.jsonl:2: \"choices\" must be a list"),
    ("not json", r"mcq.jsonl:2: not valid JSON"),
])
def test_malformed_eval_file_names_file_and_line(checkpoint, tmp_path, line, message):
    path, _ = checkpoint
    write_data(tmp_path / "data")
    mcq = tmp_path / "data" / "telco" / "eval" / "mcq.jsonl"
    mcq.write_text(json.dumps(MCQ[0]) + "\n" + line + "\n")
    with pytest.raises(SystemExit, match=message):
        ev.main([str(path), "--domain", "telco", "--data-root", str(tmp_path / "data")])


def test_missing_eval_files_are_a_clear_error(checkpoint, tmp_path):
    path, _ = checkpoint
    write_data(tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "telco" / "eval")
    with pytest.raises(SystemExit, match=r"telco/eval/: no mcq.jsonl or qa.jsonl"):
        ev.main([str(path), "--domain", "telco", "--data-root", str(tmp_path / "data")])


# -----------------------------------------------------------------------------
# Faults a user met: each one a correct result or a one-line error before the work, nothing overwritten


def test_out_is_used_as_given_so_two_reports_never_share_a_name(checkpoint, tmp_path):
    """--out o/r-0.25 and --out o/r-0.5 are two reports (a suffix cut at the last dot made both o/r-0)."""
    path, _ = checkpoint
    write_data(tmp_path / "data")
    for out in ("r-0.25", "r-0.5"):
        ev.main([str(path), "--domain", "telco", "--data-root", str(tmp_path / "data"), "--tasks", "bpb",
                 "--out", str(tmp_path / "o" / out)])
    assert sorted(os.listdir(tmp_path / "o")) == ["r-0.25.json", "r-0.25.md", "r-0.5.json", "r-0.5.md"]


def test_an_unwritable_out_is_refused_before_the_work(checkpoint, tmp_path):
    path, _ = checkpoint
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match=r"--out .*a-file/sub: cannot write there"):
        ev.main([str(path), "--domain", "telco", "--data-root", str(tmp_path / "no-data"),
                 "--out", str(tmp_path / "a-file" / "sub" / "report")])


def test_a_model_listed_twice_is_refused(checkpoint, capsys):
    path, _ = checkpoint
    with pytest.raises(SystemExit):
        ev.get_args([str(path), str(path), "--domain", "telco"])
    assert "is listed twice" in capsys.readouterr().err


def test_a_long_question_does_not_shorten_the_other_answers(checkpoint):
    """Each question gets its own budget of new tokens: a question that leaves only a few tokens of context does not
    cut the answers batched with it (the random model never stops early, so every answer is its full budget)."""
    path, _ = checkpoint
    model, tok = Transformer.from_pretrained(path).eval(), Tokenizer.from_pretrained(path)
    short = [{"prompt": "What is VoLTE?", "reference": "voice"}, {"prompt": "What is an MME?", "reference": "core"}]
    words = next(n for n in range(1, 1000) if model.config.max_seq_len - len(ev.qa_prompt(
        model, tok, {"prompt": "network " * n})) < 16)
    long = {"prompt": "network " * words, "reference": "x"}
    assert 0 < model.config.max_seq_len - len(ev.qa_prompt(model, tok, long)) < 16
    _, alone = ev.qa(model, tok, short, 16)
    _, mixed = ev.qa(model, tok, short + [long], 16)
    assert mixed[:2] == alone


def test_a_context_longer_than_the_model_is_cut_from_the_left_as_lm_eval_does(checkpoint):
    path, hf = checkpoint
    model, tok = Transformer.from_pretrained(path).eval(), Tokenizer.from_pretrained(path)
    ctx = tok.encode("the radio network " * 100)[:300]  # past the 256 positions: each pair is cut to its own fit
    pairs = [(ctx, tok.encode(" yes")), (ctx, tok.encode(" a longer answer")), (ctx[:50], tok.encode(" no"))]
    direct = []
    for c, cont in pairs:
        row = (c + cont)[-257:]
        with torch.no_grad():
            logprobs = hf(torch.tensor([row[:-1]])).logits[0].log_softmax(-1)
        direct.append(sum(logprobs[i - 1, row[i]].item() for i in range(len(row) - len(cont), len(row))))
    assert ev.loglikelihoods(Transformer.from_pretrained(path).eval(), pairs, batch_size=2) == pytest.approx(
        direct, abs=1e-4)


def test_a_questions_context_goes_through_the_model_once_for_all_its_choices(checkpoint):
    path, _ = checkpoint
    model, tok = Transformer.from_pretrained(path).eval(), Tokenizer.from_pretrained(path)
    pairs = [ev.encode_pair(tok, r["question"], " " + c) for r in MCQ for c in r["choices"]]
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    ev.loglikelihoods(model, pairs, batch_size=1)  # one question a pass: no padding of the contexts
    contexts = {}
    for ctx, cont in pairs:
        contexts.setdefault(tuple(ctx), []).append(len(cont))
    # each context once, then every choice's tokens but its last (padded to its question's longest choice)
    assert sum(seen) == sum(len(c) + len(n) * (max(n) - 1) for c, n in contexts.items())


def test_a_question_longer_than_the_context_is_named(checkpoint):
    path, _ = checkpoint
    model, tok = Transformer.from_pretrained(path).eval(), Tokenizer.from_pretrained(path)
    rows = [{"prompt": "What is VoLTE?", "reference": "voice"}, {"prompt": "the network " * 300, "reference": "x"}]
    with pytest.raises(ValueError, match=r"qa.jsonl: question 2 is \d+ tokens once rendered, which leaves no room"):
        ev.qa(model, tok, rows, 16, source="qa.jsonl")


def test_a_choice_longer_than_the_context_is_named(checkpoint):
    path, _ = checkpoint
    model, tok = Transformer.from_pretrained(path).eval(), Tokenizer.from_pretrained(path)
    rows = [{"question": "Which?", "choices": ["short", "the network " * 300], "answer": 0}]
    with pytest.raises(ValueError, match=r"mcq.jsonl: question 1, choice 2 is \d+ tokens, longer than"):
        ev.multiple_choice(model, tok, rows, source="mcq.jsonl")


def test_a_chat_template_that_fails_is_an_error_not_a_base_model(checkpoint, tmp_path):
    """A template that raises must not make eval.py score the model as a base model with exit 0."""
    path, _ = checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0].content }}{{ nothing.here }}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    write_data(tmp_path / "data")
    with pytest.raises(SystemExit, match=r"tokenizer_config.json: the chat template failed"):
        ev.main([str(broken), "--domain", "telco", "--data-root", str(tmp_path / "data"), "--tasks", "qa",
                 "--out", str(tmp_path / "report")])
