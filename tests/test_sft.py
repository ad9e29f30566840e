"""Chat rendering and curriculum SFT: render_chat gives apply_chat_template's ids for a ChatML and a Llama-3
tokenizer, the mask covers exactly the assistant turns, the curriculum keeps its stages in order (or pools them with
--single-stage), and sft.py turns a checkpoint into an HF chat model that transformers loads."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import REPO

from chat import render_chat
from model import IGNORE, ModelConfig, Transformer
from tokenizer import Tokenizer


# Meta's Llama-3 (3.0) chat template: each message trimmed, bos before the first.
LLAMA3_TEMPLATE = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                   "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

MESSAGES = [
    {"role": "system", "content": "You are a helpful telco assistant."},
    {"role": "user", "content": "Why is my data slow after 20 GB?\n"},
    {"role": "assistant", "content": "Your plan throttles to 1 Mbps after its fair-use allowance."},
    {"role": "user", "content": "  Can I buy more?  "},
    {"role": "assistant", "content": "\nYes: a 5 GB add-on restores full speed until the bill date.\n\n"},
]


def corpus_texts(n=15):
    folder = os.path.join(REPO, "data", "telco", "train")
    return [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(os.listdir(folder))[:n]]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatml")
    Tokenizer.train(corpus_texts(), 500).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A Llama-3-style tokenizer: header and end-of-turn special tokens, bos, and Llama-3's template."""
    path = tmp_path_factory.mktemp("llama3")
    Tokenizer.train(corpus_texts(), 500, special_tokens=LLAMA3_SPECIALS).save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def hf_ids(path, messages, add_generation_prompt=False):
    hf = transformers.AutoTokenizer.from_pretrained(path)
    return list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
                ["input_ids"])


@pytest.mark.parametrize("fmt", ["chatml", "llama3"])
@pytest.mark.parametrize("n_messages,generation_prompt", [(5, False), (3, False), (2, True), (4, True)])
def test_render_chat_equals_apply_chat_template(fmt, n_messages, generation_prompt, request):
    path = request.getfixturevalue(fmt)
    tok = Tokenizer.from_pretrained(path)
    messages = MESSAGES[:n_messages]
    ids, mask = render_chat(tok, messages, add_generation_prompt=generation_prompt)
    assert ids == hf_ids(path, messages, generation_prompt)
    assert len(mask) == len(ids)


@pytest.mark.parametrize("fmt,end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_mask_is_exactly_the_assistant_turns(fmt, end, request):
    tok = Tokenizer.from_pretrained(request.getfixturevalue(fmt))
    messages = [m if m["role"] != "assistant" else {**m, "content": m["content"].strip()} for m in MESSAGES]
    ids, mask = render_chat(tok, messages)
    trained = [i for i, m in zip(ids, mask) if m]
    expected = [t for m in messages if m["role"] == "assistant"
                for t in tok.encode(m["content"]) + [tok.special_tokens[end]]]
    assert trained == expected
    # contiguous spans: one per assistant turn, each ending on the end-of-turn token
    spans = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(spans) == 2


# -----------------------------------------------------------------------------
# The curriculum


def test_sft_loss_trains_only_labelled_tokens():
    from train import next_token_loss
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                                    hidden_dim=32, max_seq_len=32))
    model.init_weights()
    ids = torch.randint(0, 50, (3, 10))
    labels = torch.randint(0, 50, (3, 10)).masked_fill(torch.rand(3, 10) < 0.5, IGNORE)
    logits = model(ids)
    keep = labels != IGNORE
    expected = -F.log_softmax(logits, -1)[keep].gather(-1, labels[keep][:, None]).sum()
    torch.testing.assert_close(next_token_loss(model, torch.stack([ids, labels], 1)), expected)


# -----------------------------------------------------------------------------
# sft.py end to end


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory, chatml):
    """A tiny base model on the ChatML tokenizer, and a domain with three small stages and their val sets."""
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(chatml)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.n_vocab, n_layers=2, dim=64, n_heads=4,
                                                n_kv_heads=2, hidden_dim=128, eos_token_id=tok.eos_id))
    model.init_weights()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    src = os.path.join(REPO, "data", "telco", "sft")
    for name in sorted(f for f in os.listdir(src) if f.endswith(".jsonl")):
        for sub, n in (("", 12), ("val", 4)):
            os.makedirs(root / "data" / "telco" / "sft" / sub, exist_ok=True)
            lines = open(os.path.join(src, sub, name), encoding="utf-8").read().splitlines()[:n]
            (root / "data" / "telco" / "sft" / sub / name).write_text("\n".join(lines) + "\n")
    return root


def run_sft(root, out, *extra):
    cmd = [sys.executable, os.path.join(REPO, "sft.py"), "--init-from", str(root / "base"), "--domain", "telco",
           "--data-root", str(root / "data"), "--out", str(out), "--batch-size", "4", "--micro-batch-size", "2",
           "--seq-len", "128", "--epochs", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)


def test_sft_cli_writes_a_chat_model(sft_setup):
    out = sft_setup / "out-sft"
    result = run_sft(sft_setup, out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in rows if "val/3_expert" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 9]  # before, and after each 3-step stage
    assert rows[-1]["step"] == 9 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert "| 3_expert |" in result.stdout  # the per-stage table
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in hf.config.eos_token_id
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = torch.tensor([render_chat(Tokenizer.from_pretrained(out), MESSAGES[:2], True)[0]])
    ours = Transformer.from_pretrained(out)(ids)
    torch.testing.assert_close(ours, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_sft_single_stage_and_bad_flags(sft_setup):
    out = sft_setup / "out-single"
    result = run_sft(sft_setup, out, "--single-stage")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1_general+2_telco+3_expert (9 steps)" in result.stderr + result.stdout
    bad = run_sft(sft_setup, sft_setup / "out-bad", "--epochs", "1,2")
    assert bad.returncode != 0 and "--epochs '1,2': give one value or one per stage (3 stages)" in bad.stderr
    shutil.rmtree(sft_setup / "out-bad", ignore_errors=True)


def test_sft_resumes_mid_curriculum(sft_setup):
    """Resuming from the step-6 checkpoint (stage 3 of 3) redoes steps 7-9 with the same losses. A run killed after
    that checkpoint, at stage 2's very end, but before stage 2's export, exports it when resumed."""
    out = sft_setup / "out-resume"
    first = run_sft(sft_setup, out, "--save-every", "3", "--export-stages")
    assert first.returncode == 0, first.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    shutil.rmtree(out / "stage-2-2_telco")
    again = run_sft(sft_setup, out, "--save-every", "3", "--resume", "--export-stages")
    assert (out / "stage-2-2_telco" / "config.json").is_file()
    assert again.returncode == 0, again.stderr[-3000:]
    printed = again.stdout + again.stderr
    assert "resumed from" in printed and "stage 3/3 3_expert" in printed
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))  # rows after step 6 were redone once
    for r in rows:
        if "loss" in r and r["step"] > 6:
            assert r["loss"] == pytest.approx(losses[r["step"]], abs=1e-5)


def test_sft_exports_each_stage_as_it_ends(sft_setup):
    """--export-stages: stage-1-1_general/ and stage-2-2_telco/ are the model as each stage ended. The reference:
    transformers' loss of each export on every stage's val conversations equals the val loss the run logged at that
    stage's last step (4 val conversations per stage: one batch, each counted once)."""
    out = sft_setup / "out-stages"
    result = run_sft(sft_setup, out, "--export-stages")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "val/1_general" in r}
    tok = Tokenizer.from_pretrained(out)
    for step, folder in ((3, "stage-1-1_general"), (6, "stage-2-2_telco"), (9, ".")):
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / folder)
        for stage in ("1_general", "2_telco", "3_expert"):
            nats = count = 0.0
            for line in open(sft_setup / "data" / "telco" / "sft" / "val" / f"{stage}.jsonl"):
                ids, mask = render_chat(tok, json.loads(line)["messages"])
                ids, mask = ids[:129], mask[:129]  # sft.py's cut: --seq-len 128, plus the last target
                with torch.no_grad():
                    logits = hf(torch.tensor([ids[:-1]])).logits[0]
                trained = torch.tensor(mask[1:])
                nats += F.cross_entropy(logits[trained], torch.tensor(ids[1:])[trained], reduction="sum").item()
                count += trained.sum().item()
            assert nats / count == pytest.approx(logged[step][f"val/{stage}"], rel=1e-4), (folder, stage)
    assert not (out / "stage-3-3_expert").exists()  # the last stage is the output itself
