"""tokenizer.Tokenizer against the references: HF `tokenizers` (and transformers.AutoTokenizer) give the ids we must match.

Every tokenizer.json here is built by the `tokenizers` library itself, trained on the small corpus below, in each
pre-tokenizer style we support (GPT-2, Llama-3, Qwen2, SmolLM2). Nothing is compared against our own output.
"""
import base64
import glob
import itertools
import json
import random
import unicodedata
from collections import Counter

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from conftest import REAL_MODEL, REPO, needs_real_model
from bpe_train import TRAIN_SPLIT
from tokenizer import BYTE_TO_CHAR, Tokenizer

# A small multilingual corpus written for these tests: prose, code, CJK, emoji, digits, CRLF, tabs, long whitespace.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We'll see, they've said.",
    "Domain-adaptive pretraining keeps general ability when half of every batch is replayed general text.",
    "The telco operator reported 1,234,567 subscribers in Q3 2024, up 12.5% from 987,654 a year earlier.",
    "Call 080-123-4567 or dial *#06# to check your device; roaming costs $9.99/day in 2025.",
    "def add(a, b):\n    return a + b\n\n\nclass Cache:\n    def __init__(self, size=128):\n        self.size = size\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f\"{i} is even\")\n\telse:\n\t\tcontinue\n",
    "import torch\nx = torch.zeros(4, 8)  # shape [B, T]\ny = x @ x.T\n",
    "Windows lines end in CRLF.\r\nLike this one.\r\n\r\nAnd a blank line before this one.\r\n",
    "Columns\tseparated\tby\ttabs\t\tand\tdouble\ttabs.",
    "Long      runs   of     spaces        appear          in        aligned        text.",
    "요금제를 변경하고 싶습니다. 데이터 무제한 요금제는 월 69,000원입니다. 감사합니다!",
    "통신사 고객센터는 연중무휴로 운영됩니다. 해지 신청은 온라인으로도 가능합니다.",
    "我们的网络覆盖全国三百多个城市。请问您需要办理什么业务？流量套餐每月五十元。",
    "今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据进行训练。",
    "東京の天気は晴れです。携帯電話の契約を更新したいのですが、どうすればいいですか？",
    "ひらがなとカタカナと漢字が混ざった文章です。ありがとうございました。",
    "Emoji time 😀😂🎉👍 and flags 🇰🇷🇯🇵 and a family 👩‍👩‍👧 and hearts ❤️💙.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -42 +7 1e-5 0x1F.",
    "Mixed: café naïve résumé Ünïcödé ñandú Straße Ærø smørrebrød",
    "Привет, как дела? Всё хорошо. Ελληνικά γράμματα. مرحبا بالعالم. שלום עולם.",
    "हिन्दी में लिखा गया वाक्य। ภาษาไทยก็มีเช่นกัน",
    "JSON: {\"role\": \"user\", \"content\": \"Hello!\"}\nURL: https://example.com/a/b?c=1&d=2",
    "    indented with four spaces\n        and eight\n\n\n\nafter four newlines",
]

# Strings for encoding checks, mostly not in the corpus: unseen words, mixed scripts, whitespace at piece edges.
TEXTS = CORPUS + [
    "",
    "a",
    "a  1",
    "x   12 3",
    "\n\n 42",
    "   \t 7 and\t\t8",
    "1234567 12345678901234567890",
    "\r\n\r\n",
    "foo\r\n\r\n   bar\r\n",
    " " * 40,
    " " * 40 + "x",
    "\t\t\tdeeply\ttabbed\t",
    "  leading and trailing  ",
    "x\n\n\n",
    "I'M SURE THEY'LL SAY IT'S FINE, YOU'RE RIGHT, WE'VE DONE IT'D",
    "'s 's 'S 'ſ",
    "e\u0301 cafe\u0301 \u1100\u1161\u11a8\u1100\u1161 Å Å",  # decomposed: NFC changes these
    "unseen zymurgy quixotic flibbertigibbet Xylophone",
    "한국어English中文日本語mixed123together",
    "½ Ⅻ ٣٤٥ ① ² ๓",
    "nbsp\u00a0here ideographic\u3000space line\u2028sep nel\x85here vt\x0bff\x0c",
    "zwj 👩‍💻 flag 🏳️‍🌈 skin 👍🏽",
    "\x00\x01\x7f control",
    "__init__ __dunder__ snake_case_name x_1",
    "<|endoftext|>",  # special-token strings are plain text for encode()
    "before<|im_start|>user\nhi<|im_end|>after",
]

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]


def hf_tokenizer(style, lacking=b""):
    """An HF byte-level BPE tokenizer in one of the public styles, trained on CORPUS by `tokenizers`. Llama-3 sets
    ignore_merges (a whole piece found in the vocab is one token), the others do not. `lacking`: bytes left out of
    the vocabulary (CORPUS never uses them), as SmolLM2's lacks 21."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = lambda pattern: pre_tokenizers.Split(tokenizers.Regex(pattern), "isolated")  # noqa: E731
    if style == "gpt2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "llama3":
        pre = pre_tokenizers.Sequence([split(LLAMA3_PATTERN), byte_level])
    elif style == "qwen2":
        pre = pre_tokenizers.Sequence([split(QWEN2_PATTERN), byte_level])
    elif style == "smollm2":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    tok.pre_tokenizer = pre
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in {BYTE_TO_CHAR[b] for b in lacking}]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    assert not {BYTE_TO_CHAR[b] for b in lacking} & set(tok.get_vocab())
    return tok


def save_hf(tok, path, config=None):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


STYLES = ["gpt2", "llama3", "qwen2", "smollm2"]


@pytest.fixture(scope="module", params=STYLES)
def style_dir(request, tmp_path_factory):
    """(style, directory with tokenizer.json + tokenizer_config.json, the HF tokenizer)."""
    hf = hf_tokenizer(request.param)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param),
                   {"eos_token": "<|endoftext|>", "bos_token": {"content": "<|begin_of_text|>", "special": True}})
    hf.encode_special_tokens = True  # HF would cut "<|endoftext|>" out of the text; our encode() reads it as text
    return request.param, path, hf


def test_same_ids_as_hf(style_dir):
    style, path, hf = style_dir
    ours = Tokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, (style, text)
    assert ours.encode_batch(TEXTS) == [e.ids for e in hf.encode_batch(TEXTS, add_special_tokens=False)]
    assert ours.n_vocab == hf.get_vocab_size()


def test_decode_roundtrip(style_dir):
    style, path, hf = style_dir
    ours = Tokenizer.from_pretrained(path)
    for text in TEXTS:
        expected = unicodedata.normalize("NFC", text) if style == "qwen2" else text
        assert ours.decode(ours.encode(text)) == expected, (style, text)
    ids = [hf.token_to_id("<|im_start|>")] + ours.encode("hello") + [hf.token_to_id("<|endoftext|>")]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<|endoftext|>"


def test_eos_bos_from_tokenizer_config(style_dir):
    style, path, hf = style_dir
    ours = Tokenizer.from_pretrained(path)
    assert ours.eos_id == hf.token_to_id("<|endoftext|>")
    assert ours.bos_id == hf.token_to_id("<|begin_of_text|>")
    assert ours.special_tokens["<|im_end|>"] == hf.token_to_id("<|im_end|>")


def test_eos_bos_from_generation_config(tmp_path):
    hf = hf_tokenizer("gpt2")
    path = save_hf(hf, tmp_path)
    tok = Tokenizer.from_pretrained(path)
    assert (tok.eos_id, tok.bos_id) == (None, None)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "bos_token_id": 3}))
    tok = Tokenizer.from_pretrained(path)
    assert (tok.eos_id, tok.bos_id) == (2, 3)  # a list means several stop tokens: the first is eos
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))  # comes first
    tok = Tokenizer.from_pretrained(path)
    assert (tok.eos_id, tok.bos_id) == (hf.token_to_id("<|im_end|>"), 3)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token '</s>'"):
        Tokenizer.from_pretrained(path)


def test_legacy_string_merges(tmp_path):
    """Older tokenizer.json files store merges as "a b" strings rather than ["a", "b"] pairs."""
    hf = hf_tokenizer("gpt2")
    spec = json.loads(hf.to_str())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    old = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:30]:
        assert ours.encode(text) == old.encode(text, add_special_tokens=False).ids == hf.encode(text).ids


def test_llama3_conversion_from_tiktoken(tmp_path):
    """Llama-3's tokenizer.json was made from a tiktoken file by transformers' TikTokenConverter, which lists every
    split of every token as a merge: merged ids repeat and some parts have higher ids than the result."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    char_to_byte = {c: b for b, c in convert.bytes_to_unicode().items()}
    vocab = hf_tokenizer("llama3").get_vocab()
    ranked = sorted((i, bytes(char_to_byte[c] for c in s)) for s, i in vocab.items() if s not in SPECIALS)
    (tmp_path / "ranks.tiktoken").write_text(  # tiktoken's file format: base64 token, rank
        "".join(f"{base64.b64encode(b).decode()} {rank}\n" for rank, (_, b) in enumerate(ranked)))
    hf = convert.TikTokenConverter(str(tmp_path / "ranks.tiktoken"), extra_special_tokens=SPECIALS).converted()
    path = save_hf(hf, tmp_path / "llama3", {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"})
    spec = json.loads(hf.to_str())
    v, merges = spec["model"]["vocab"], spec["model"]["merges"]
    assert len(merges) > len(v) - 256 and any(max(v[a], v[b]) > v[a + b] for a, b in merges)  # the case is real
    ours = Tokenizer.from_pretrained(path)
    hf.encode_special_tokens = True
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert (ours.bos_id, ours.eos_id) == (hf.token_to_id("<|begin_of_text|>"), hf.token_to_id("<|endoftext|>"))


FUZZ_PIECES = [" ", "  ", "   ", "\t", "\n", "\r", "\r\n", "\x0b", "\x85", "\u00a0", "\u2028", "\u3000", "\u200d",
               "a", "B", "the", " the", "é", "e\u0301", "\u1100\u1161", "ſ", "1", "23", "456", "٣", "½", "'s", "'S",
               "'ll", "'", "_", "-", ".", "!?", "한국", "中文", "😀", "👩‍💻", "\x00", "<|endoftext|>", "ß", "İ"]


def test_fuzz_against_hf(style_dir):
    """Random strings made of the pieces where regex engines and pre-tokenizers tend to disagree."""
    style, path, hf = style_dir
    rng = random.Random(style)
    texts = ["".join(rng.choices(FUZZ_PIECES, k=rng.randint(1, 25))) for _ in range(1000)]
    ours = Tokenizer.from_pretrained(path)
    assert ours.encode_batch(texts) == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


# ---- vocabularies that lack some single-byte tokens: HF drops those bytes (after the split, before merging)

# SmolLM2's 21, plus "Z" (a letter: Llama-3's regex joins a lone symbol to the word after it) and 0x93 (a continuation
# byte, in "–" U+2013, "ē" U+0113 and "😓"). CORPUS uses none of them.
LACKING = bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0x5a, 0x93, 0xc0, 0xc1, 0xf1, 0xf2, *range(0xf5, 0x100)])
LACKING_PIECES = ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\x04\x04\x04", "Z", "Zone", "aZb", "–", "ē", "😓",
                  chr(0x40000), chr(0x7ffff), chr(0xbffff), chr(0xc0000), "!\x04!", " \x04the", "\x04's", "\x04\n"]
LACKING_TEXTS = [
    "a\x04b", "hello\x04world", "helloworld", " \x04the", "!\x04!", "!!", chr(0x40000), "\x04", "\x04 \x04", "Z",
    "!" * 300 + "\x04" + "?" * 300,  # a piece much longer than the first probes reach
    "\x04" * 500, " " * 50 + "\x1d" + " " * 50, "Zürich – 😓 ē " * 3, "".join(map(chr, range(32))) + "\x7f",
    "x" * 2000 + "Z" + "y" * 2000, "\x04" + "ab" * 30 + "\x06", "e\u0301\x04 cafe\u0301Z",
]


@pytest.fixture(scope="module", params=STYLES)
def lacking_dir(request, tmp_path_factory):
    """(style, directory, HF tokenizer) for a tokenizer.json whose vocabulary lacks the LACKING bytes."""
    hf = hf_tokenizer(request.param, lacking=LACKING)
    path = save_hf(hf, tmp_path_factory.mktemp(f"lacking-{request.param}"))
    hf.encode_special_tokens = True
    return request.param, path, hf


def test_lacking_bytes_dropped_as_hf_does(lacking_dir):
    style, path, hf = lacking_dir
    ours = Tokenizer.from_pretrained(path)
    assert ours.missing == LACKING and ours.n_vocab == hf.get_vocab_size()
    rng = random.Random(style)
    fuzz = ["".join(rng.choices(FUZZ_PIECES + LACKING_PIECES, k=rng.randint(1, 25))) for _ in range(2000)]
    texts = LACKING_TEXTS + TEXTS + fuzz
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert ours.encode_batch(texts) == expected
    for text, ids in zip(texts[:300], expected):
        assert ours.encode(text) == ids, (style, text)
        assert ours.decode(ids) == hf.decode(ids), (style, text)


def test_refuses_a_token_holding_a_lacking_byte(tmp_path):
    """HF drops a byte it has no token for, but would emit a longer token holding it whole (ignore_merges)."""
    with pytest.raises(ValueError, match=r"tokenizer.json: model.vocab has 'Ġ.*' \(id \d+\) but no single-byte token "
                                         r"for its byte 0x20"):
        Tokenizer.from_pretrained(edited_gpt2(tmp_path, lambda model: model["vocab"].pop("Ġ")))


def test_refuses_lacking_bytes_with_unk_token(tmp_path):
    def edit(model):
        model["vocab"].pop("Ā")  # byte 0x00
        model["unk_token"] = "<|endoftext|>"
    with pytest.raises(ValueError, match="tokenizer.json: model.unk_token is '<|endoftext|>' and model.vocab lacks 1"):
        Tokenizer.from_pretrained(edited_gpt2(tmp_path, edit))


# ---- the real SmolLM2-135M-Instruct tokenizer.json (it lacks 21 single-byte tokens)

REAL_TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 9:30 a.m.; we'll see, they've said. USA/UK e-mail",
    "code": "def f(x):\n    return {'a': [1, 2, 3]}  # note\n\tif x != 0:\n\t\tprint(f\"{x:>10}\")\n\n\nclass A: pass\n",
    "korean": "요금제를 변경하고 싶습니다. 데이터 무제한 요금제는 월 69,000원입니다. 감사합니다!",
    "chinese": "我们的网络覆盖全国三百多个城市。请问您需要办理什么业务？流量套餐每月五十元。",
    "emoji": "😀😂🎉👍 flags 🇰🇷🇯🇵 family 👩‍👩‍👧 ❤️💙 skin 👍🏽 zwj 👩‍💻",
    "controls": "".join(map(chr, range(32))) + "\x7f" + " a\x04b \x1d\x1d x\x13\x14y \x16 \x06!\x06! end\x04",
    "whitespace": " " * 17 + "x\t\t\n\n\n  \r\n   y" + " " * 40 + "\n" + "\u3000\u00a0\u2028 z  ",
    "planes": f"{chr(0x40000)}a{chr(0x7ffff)} {chr(0xbffff)}{chr(0xc0000)}{chr(0x10ffff)}{chr(0x3ffff)}",
}


@pytest.fixture(scope="module")
def real():
    ours = Tokenizer.from_pretrained(REAL_MODEL)
    hf = tokenizers.Tokenizer.from_file(f"{REAL_MODEL}/tokenizer.json")
    hf.encode_special_tokens = True
    return ours, hf


@needs_real_model
@pytest.mark.parametrize("kind", list(REAL_TEXTS))
def test_real_smollm2_same_ids_as_hf(real, kind):
    ours, hf = real
    text = REAL_TEXTS[kind]
    ids = hf.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) == ids
    assert ours.encode_batch([text, text[::-1]]) == [ids, hf.encode(text[::-1], add_special_tokens=False).ids]
    assert ours.decode(ids) == hf.decode(ids)


@needs_real_model
def test_real_smollm2_fuzz_and_corpus(real):
    ours, hf = real
    assert len(ours.missing) == 21 and ours.n_vocab == hf.get_vocab_size()
    rng = random.Random(0)
    controls = [chr(c) for c in [*range(32), 0x7f]] + [chr(0x40000), chr(0xbffff)]
    texts = ["".join(rng.choices(FUZZ_PIECES + controls, k=rng.randint(1, 25))) for _ in range(2000)]
    texts += [t for t in CORPUS + TEXTS]
    texts += [open(f, encoding="utf-8").read() for f in sorted(glob.glob(f"{REPO}/data/telco/train/*.txt"))[:10]]
    assert ours.encode_batch(texts) == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


# ---- trained with Tokenizer.train, loaded by the references

CHAT = [{"role": "system", "content": "You are a telco assistant."},
        {"role": "user", "content": "요금제 변경 방법을 알려주세요."},
        {"role": "assistant", "content": "Open the app, then Plans > Change."}]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    tok = Tokenizer.train(CORPUS, vocab_size=600)
    path = tmp_path_factory.mktemp("trained")
    tok.save_pretrained(path)
    return tok, path


def test_trained_vocab(trained_dir):
    tok, path = trained_dir
    assert tok.n_vocab == 600  # 256 bytes + 341 merges + 3 special tokens
    assert [tok.special_tokens[s] for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]] == [597, 598, 599]
    assert tok.eos_id == 597 and tok.bos_id is None
    hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    assert hf.get_vocab_size() == 600
    assert hf.token_to_id("<|endoftext|>") == 597


def test_trained_matches_hf(trained_dir):
    transformers = pytest.importorskip("transformers")
    tok, path = trained_dir
    auto = transformers.AutoTokenizer.from_pretrained(path)
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    raw.encode_special_tokens = True
    reloaded = Tokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        assert ids == reloaded.encode(text), text
        if "<|" not in text:  # AutoTokenizer always cuts special-token strings out of the text
            assert ids == auto.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert auto.eos_token_id == tok.eos_id and reloaded.eos_id == tok.eos_id
    assert len(auto) == tok.n_vocab
    assert len(tok.encode(" ".join(CORPUS))) < 0.6 * len(" ".join(CORPUS).encode())  # it did learn something


def test_trained_chat_template(trained_dir):
    transformers = pytest.importorskip("transformers")
    tok, path = trained_dir
    auto = transformers.AutoTokenizer.from_pretrained(path)
    text = auto.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a telco assistant.<|im_end|>\n"
                    "<|im_start|>user\n요금제 변경 방법을 알려주세요.<|im_end|>\n"
                    "<|im_start|>assistant\nOpen the app, then Plans > Change.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = auto.encode(text, add_special_tokens=False)  # special tokens in the text are cut out as such by HF
    assert ids.count(tok.special_tokens["<|im_start|>"]) == 4 and ids.count(tok.special_tokens["<|im_end|>"]) == 3
    assert Tokenizer.from_pretrained(path).chat_template == tok.chat_template


def test_save_copies_hf_files(tmp_path):
    src = save_hf(hf_tokenizer("qwen2"), tmp_path / "src", {"eos_token": "<|im_end|>", "chat_template": "{{x}}"})
    Tokenizer.from_pretrained(src).save_pretrained(tmp_path / "dst")
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert not list((tmp_path / "dst").glob("*.tmp*"))


def naive_bpe_merges(texts, n_merges):
    """The textbook trainer (Sennrich et al. 2016): recount every pair before every merge. Slow, obviously right.
    Same chunks as Tokenizer.train and the same tie-break (the most frequent pair, then the smallest ids)."""
    words = Counter(tuple(c.encode()) for t in texts for c in TRAIN_SPLIT.findall(unicodedata.normalize("NFC", t)))
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = Counter()
        for word, f in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += f
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = Counter()
        for word, f in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    return merges


def test_trainer_matches_naive_bpe():
    texts = CORPUS + ["aaaa bbbb abab aaaaaaa ababab abababa " * 3]  # overlapping pairs: "aaa" -> [aa, a]
    assert Tokenizer.train(texts, vocab_size=256 + 300 + 3).merges == naive_bpe_merges(texts, 300)


def test_train_a_few_megabytes():
    """~2 MB of varied text (tens of thousands of distinct words) must train in seconds, not minutes."""
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + list("가나다라마바사아자하的是不了人我在有他这")
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 5))) for _ in range(50_000)]
    zipf = list(itertools.accumulate(1 / (i + 1) for i in range(len(lexicon))))  # word frequencies as in real text
    texts, size = [], 0
    while size < 2_000_000:
        line = " ".join(rng.choices(lexicon, cum_weights=zipf, k=20))
        line += rng.choice([". 2024\n", ", 3.14 ", "\r\n", "\n\n"])
        texts.append(line)
        size += len(line.encode())
    tok = Tokenizer.train(texts, vocab_size=2000)
    assert tok.n_vocab == 2000
    sample = "".join(texts[:50])
    assert tok.decode(tok.encode(sample)) == unicodedata.normalize("NFC", sample)
    assert len(tok.encode(sample)) < len(sample.encode()) / 3


# ---- files tiktoken cannot reproduce exactly: refused, naming the file and the field


@pytest.mark.parametrize("setting, field", [
    (lambda t: setattr(t.model, "byte_fallback", True), "model.byte_fallback"),
    (lambda t: setattr(t.model, "continuing_subword_prefix", "##"), "model.continuing_subword_prefix"),
    (lambda t: setattr(t.model, "dropout", 0.1), "model.dropout"),
    (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace()), "pre_tokenizer"),
    (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
     "pre_tokenizer ByteLevel.add_prefix_space"),
    (lambda t: setattr(t, "normalizer", normalizers.NFKC()), "normalizer"),
])
def test_refuses_settings(tmp_path, setting, field):
    hf = hf_tokenizer("gpt2")
    setting(hf)
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"tokenizer.json: {field}"):
        Tokenizer.from_pretrained(tmp_path)


def edited_gpt2(path, edit):
    spec = json.loads(hf_tokenizer("gpt2").to_str())
    edit(spec["model"])
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


def test_refuses_merges_out_of_vocab_order(tmp_path):
    def swap(model):
        merges = model["merges"]
        merges[10], merges[200] = merges[200], merges[10]
    with pytest.raises(ValueError, match=r"tokenizer.json: model.merges\[\d+\].*merge order disagrees"):
        Tokenizer.from_pretrained(edited_gpt2(tmp_path, swap))


@pytest.mark.parametrize("model, name", [
    (models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -1.5)], unk_id=0), "Unigram"),
    (models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"), "WordPiece"),
    (models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"), "WordLevel"),
])
def test_refuses_other_models(tmp_path, model, name):
    tokenizers.Tokenizer(model).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=rf"tokenizer.json: model.type is '{name}'"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
