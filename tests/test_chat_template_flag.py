"""--chat-template FILE (chat.use_chat_template): a checkpoint without a chat template (a base model) is given one, or
a checkpoint's own is replaced. sft.py trains with it and exports it, so transformers' apply_chat_template on the
exported model gives the ids it was trained on; --resume refuses another template; a bad file is a one-line error
naming it, in every command; eval.py and speculative.py render their prompts with it.

The base checkpoint here is tiny and random, on a tokenizer with Gemma's turn markers (<start_of_turn>,
<end_of_turn>) and no template, as Gemma-3-270M's is; the template is our sample data/chat_templates/gemma.jinja."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

import eval as ev
import speculative
from chat import end_of_turn_id, render_chat, use_chat_template
from conftest import REPO
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

GEMMA = os.path.join(REPO, "data", "chat_templates", "gemma.jinja")
CHATML = os.path.join(REPO, "data", "chat_templates", "chatml.jinja")
GEMMA_TOKENS = ("<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")  # eos first: Tokenizer.train's convention
CONVERSATIONS = [
    ([{"role": "system", "content": "You are a telco assistant."},
      {"role": "user", "content": "Why is my data slow after 20 GB?\n"},
      {"role": "assistant", "content": " Your plan throttles to 1 Mbps after its allowance.\n\n"},
      {"role": "user", "content": "Can I buy more?"},
      {"role": "assistant", "content": "Yes: a 5 GB add-on."}], False),
    ([{"role": "user", "content": "요금제를 바꾸고 싶어요 😀"}], True),
]


def sample_texts(n=10):
    folder = os.path.join(REPO, "data", "telco", "train")
    return [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(os.listdir(folder))[:n]]


def copy_lines(src, dst, n):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(open(src, encoding="utf-8").readlines()[:n]), encoding="utf-8")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random base checkpoint whose tokenizer has Gemma's turn markers and bos but no chat template, a data
    root with two small SFT stages, a val text and four QA rows, and a copy of gemma.jinja to train with."""
    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train(sample_texts(), 400, special_tokens=GEMMA_TOKENS)
    tok.save_pretrained(root / "base")
    config = json.loads((root / "base" / "tokenizer_config.json").read_text())
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<bos>"}))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.n_vocab, n_layers=1, dim=32, n_heads=2,
                                                n_kv_heads=1, hidden_dim=64, eos_token_id=tok.eos_id,
                                                bos_token_id=tok.special_tokens["<bos>"]))
    model.init_weights()
    model.save_pretrained(root / "base")
    telco = os.path.join(REPO, "data", "telco")
    for name in ("1_general.jsonl", "2_telco.jsonl"):
        copy_lines(os.path.join(telco, "sft", name), root / "data" / "telco" / "sft" / name, 8)
    copy_lines(os.path.join(telco, "eval", "qa.jsonl"), root / "data" / "telco" / "eval" / "qa.jsonl", 4)
    val = sorted(os.listdir(os.path.join(telco, "val")))[0]
    copy_lines(os.path.join(telco, "val", val), root / "data" / "telco" / "val" / val, 20)
    shutil.copy(GEMMA, root / "turns.jinja")
    return root


def run_cmd(root, script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                          text=True, cwd=root, env=env, timeout=300)


def run_sft(root, out, *extra):
    return run_cmd(root, "sft.py", "--init-from", root / "base", "--domain", "telco", "--data-root", root / "data",
                   "--out", out, "--batch-size", "4", "--micro-batch-size", "4", "--seq-len", "96", "--epochs", "1",
                   "--save-every", "2", *extra)


@pytest.fixture(scope="module")
def trained(base):
    """sft.py on the base checkpoint with --chat-template: the exported chat model."""
    out = base / "sft"
    result = run_sft(base, out, "--chat-template", base / "turns.jinja")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


def one_line_error(result):
    """A command's user error: non-zero exit, no traceback, the message on stderr's last line."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_sft_without_a_template_names_the_flag(base):
    """A base checkpoint and no --chat-template: sft.py stops before any work, saying which file lacks a template and
    which flag supplies one."""
    error = one_line_error(run_sft(base, base / "no-template"))
    assert f"{base / 'base' / 'tokenizer_config.json'}: no chat_template" in error
    assert "pass --chat-template FILE" in error
    assert not (base / "no-template" / "run.json").exists()


def test_sft_exports_the_template_it_trained_with(base, trained):
    """The exported tokenizer_config.json carries the file's template, and config.json stops at its end of turn."""
    assert json.loads((trained / "tokenizer_config.json").read_text())["chat_template"] == \
        (base / "turns.jinja").read_text()
    assert not (trained / "chat_template.jinja").exists()
    end_of_turn = Tokenizer.from_pretrained(base / "base").special_tokens["<end_of_turn>"]
    assert end_of_turn in json.loads((trained / "config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_transformers_renders_the_export_as_sft_did(base, trained, k):
    """apply_chat_template on the export gives exactly render_chat's ids with the --chat-template file on the base
    tokenizer: the ids SFT trained on."""
    messages, generation_prompt = CONVERSATIONS[k]
    hf = transformers.AutoTokenizer.from_pretrained(trained)
    expected = list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
                    ["input_ids"])
    tok = Tokenizer.from_pretrained(base / "base")
    use_chat_template(tok, str(base / "turns.jinja"))
    assert render_chat(tok, messages, generation_prompt)[0] == expected
    assert render_chat(Tokenizer.from_pretrained(trained), messages, generation_prompt)[0] == expected


def test_the_flag_replaces_a_checkpoints_own_template(tmp_path):
    """A checkpoint's template (here ChatML in both tokenizer_config.json and chat_template.jinja) is replaced: the
    saved tokenizer holds only the new one, and transformers renders with it."""
    tok = Tokenizer.train(sample_texts(5), 350)  # ChatML tokens and template
    tok.save_pretrained(tmp_path / "own")
    (tmp_path / "own" / "chat_template.jinja").write_text(tok.chat_template)
    system = tmp_path / "system.jinja"  # ChatML with a fixed system prompt
    system.write_text(open(CHATML).read().replace("{%- for", "{{ '<|im_start|>system\\nAnswer as a telco agent."
                                                               "<|im_end|>\\n' }}{%- for"))
    tok = Tokenizer.from_pretrained(tmp_path / "own")
    use_chat_template(tok, str(system))
    tok.save_pretrained(tmp_path / "saved")  # what export_hf writes
    assert not (tmp_path / "saved" / "chat_template.jinja").exists()
    messages, _ = CONVERSATIONS[0]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    ids = list(hf.apply_chat_template(messages[1:], tokenize=True)["input_ids"])
    assert ids == render_chat(tok, messages[1:])[0]
    assert hf.decode(ids).startswith("<|im_start|>system\nAnswer as a telco agent.<|im_end|>\n<|im_start|>user\n")


def test_resume_with_another_template_is_refused(base, trained):
    """The template's sha256 is a run setting: --resume with the file changed is refused, as other changed settings
    are."""
    path = base / "turns.jinja"
    original = path.read_text()
    try:
        path.write_text(original.replace("'model'", "'assistant'"))
        error = one_line_error(run_sft(base, trained, "--chat-template", path, "--resume"))
    finally:
        path.write_text(original)
    assert error.startswith(f"--resume: {trained} was started with other settings: --chat-template-sha256 ")


@pytest.mark.parametrize("content,message", [
    (None, "cannot read it (No such file or directory)"),
    (b"\xff\xfe{{ messages }}", "not UTF-8 text"),
    (b"  \n", "the file is empty"),
    (b"{% for m in messages %}{{ m.content }}", "the chat_template is not valid Jinja (line 1: "),
    (b"{{ raise_exception('no system messages') }}", "the chat template refuses this conversation: no system"),
    (b"{% for m in messages %}{{ m.content }}{{ m.name.upper() }}{% endfor %}", "the chat template failed: "
                                                                                 "UndefinedError"),
    (open(CHATML, "rb").read(), "ends an answer with '<|im_end|>', which is not one of the control tokens"),
    (b"{% for m in messages %}<start_of_turn>{{ m.content }}\n{% endfor %}", "writes nothing that ends an answer"),
])
def test_a_bad_template_file_is_an_error_naming_it(base, tmp_path, content, message):
    """Missing, not UTF-8, empty, not Jinja, refusing or failing on a conversation, or ending an answer with no
    control token of the tokenizer (ChatML's <|im_end|> on a Gemma-style vocabulary): a ValueError naming the file."""
    path = tmp_path / "template.jinja"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        use_chat_template(Tokenizer.from_pretrained(base / "base"), str(path))
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("script,args", [
    ("sft.py", ["--init-from", "base", "--data-root", "data", "--out", "out-sft"]),
    ("distill.py", ["--teacher", "base", "--data-root", "data", "--out", "out-distill"]),
    ("eval.py", ["base", "--domain", "telco", "--data-root", "data", "--general", "", "--tasks", "qa", "--out",
                 "out-eval"]),
    ("speculative.py", ["--target", "base", "--prompt", "Hi"]),
])
def test_every_command_names_a_missing_template_file(base, script, args):
    """Each command that renders chats takes --chat-template, and a file that is not there is a one-line error
    naming it, with a non-zero exit and no traceback."""
    error = one_line_error(run_cmd(base, script, *args, "--chat-template", "nowhere.jinja"))
    assert "--chat-template nowhere.jinja: cannot read it" in error


@pytest.fixture(scope="module")
def stripped(trained, tmp_path_factory):
    """The SFT'd chat model with its template removed (as a conversion that drops it would leave it)."""
    path = tmp_path_factory.mktemp("stripped") / "model"
    shutil.copytree(trained, path, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": None}))
    assert end_of_turn_id(Tokenizer.from_pretrained(path)) is None
    return path


def test_eval_renders_qa_prompts_with_the_flag(base, stripped, monkeypatch):
    """eval.py --chat-template: a chat model without a template gets its QA questions rendered by the file, with
    the generation prompt, and stops at the template's end of turn."""
    seen, stops = [], set()

    def generate_batch(model, prompts, max_new_tokens, eos_id=None):
        seen.extend(prompts)
        stops.add(eos_id)
        return [[eos_id] for _ in prompts]
    monkeypatch.setattr(ev, "generate_batch", generate_batch)
    ev.main([str(stripped), "--domain", "telco", "--data-root", str(base / "data"), "--general", "", "--tasks",
             "qa", "--limit", "2", "--out", str(base / "eval-report"), "--chat-template", GEMMA])
    tok = Tokenizer.from_pretrained(base / "base")
    use_chat_template(tok, GEMMA)
    rows = [json.loads(line) for line in open(base / "data" / "telco" / "eval" / "qa.jsonl")][:2]
    expected = [render_chat(tok, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
                for r in rows]
    assert sorted(seen) == sorted(expected) and stops == {tok.special_tokens["<end_of_turn>"]}


def test_speculative_renders_the_prompt_with_the_flag(base, stripped, monkeypatch, capsys):
    """speculative.py --chat-template: the --prompt of a chat target without a template is rendered by the file."""
    seen = []

    def generate(model, ids, max_new_tokens, **kw):
        seen.append((ids, kw["eos_id"]))
        return []
    monkeypatch.setattr(speculative, "generate", generate)
    speculative.main(["--target", str(stripped), "--prompt", "Why is my data slow?", "--max-new-tokens", "4",
                      "--chat-template", GEMMA])
    tok = Tokenizer.from_pretrained(base / "base")
    use_chat_template(tok, GEMMA)
    ids = render_chat(tok, [{"role": "user", "content": "Why is my data slow?"}], add_generation_prompt=True)[0]
    assert seen == [(ids, tok.special_tokens["<end_of_turn>"])]
