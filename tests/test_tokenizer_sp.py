"""tokenizer.Tokenizer on SentencePiece-style BPE (Llama-2, Mistral, Gemma) against HF `tokenizers`' ids and decode.

Each synthetic tokenizer.json is trained here by `tokenizers` in one of the styles public checkpoints use (a legacy
Prepend + Replace normalizer, a Metaspace pre-tokenizer with each prepend scheme, split or not, Gemma's Replace +
Split), with byte fallback on or off, fuse_unk, and both kinds of merge list: as a BPE trainer learns it (one split
per token) and as transformers converts a SentencePiece model (every split of every token). The real Mistral v0.1 /
v0.3 and Gemma-3 tokenizers are used when prepare_real_model.py has made them (SP_TOKENIZERS: another folder).
"""
import json
import os
import random

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from conftest import REPO
from tokenizer import Tokenizer

SPACE = "\u2581"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We'll see.",
    "Domain-adaptive pretraining keeps general ability when half of every batch is replayed general text.",
    "The operator reported 1,234,567 subscribers in Q3 2024, up 12.5% from a year earlier.",
    "def add(a, b):\n    return a + b\n\n\nclass Cache:\n\tdef __init__(self, size=128):\n\t\tself.size = size\n",
    "Long      runs   of     spaces        appear          in        aligned        text.",
    "요금제를 변경하고 싶습니다. 데이터 무제한 요금제는 월 69,000원입니다. 감사합니다!",
    "我们的网络覆盖全国三百多个城市。请问您需要办理什么业务？流量套餐每月五十元。",
    "مرحبا بالعالم. كيف حالك اليوم؟ شكرا جزيلا.",
    "हिन्दी में लिखा गया वाक्य। यह एक परीक्षण है।",
    "Привет, как дела? Всё хорошо, спасибо. Мы проверяем токенизатор.",
    "Emoji time 😀😂🎉👍 and flags 🇰🇷🇯🇵 and a family 👩‍👩‍👧 and hearts ❤️💙.",
    "Mixed: café naïve résumé Straße smørrebrød <b>bold</b> text",
]
TEXTS = CORPUS + [
    "", " ", "  ", "a", " a", "a ", "  leading and trailing  ", "\n", "\n\n\n", "\t", " \n ", "x\n\n\ty",
    f"{SPACE}", f"{SPACE}x", f"already {SPACE}{SPACE}metaspace{SPACE} here", f" {SPACE} mixed {SPACE}",
    "unseen zymurgy quixotic flibbertigibbet", "Ω ẞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff \ue000 ꙮ",  # outside the vocabulary
    "한국어English中文日本語mixed123together", "zwj 👩‍💻 flag 🏳️‍🌈 skin 👍🏽", "\x00\x01\x7f control",
    " " * 40 + "x", "<s>inside</s> <unk> <0x41> [INST]", "<start_of_turn>art <b>x</b>", "a</s><s>b",
    "[REF] after", "[REF]after [REF]  two", "before [REF]", "[REF][REF]", "\x01[REF]\x01\n\x01<b>art\x01\x02",
]
FUZZ_PIECES = [" ", "  ", "\n", "\n\n", "\t", "a", "the", " the", "é", "한국", "中文", "😀", "Ω", "𝔘", SPACE, "<b>",
               "</b>", "<s>", "</s>", "art", "[REF]", "<start_of_turn>", "<0x41>", "1", ".", "\u200d", "ك", "\x01"]

SPECIALS = ["<unk>", "<s>", "</s>"]
DECODER = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
STYLES = {  # name: (normalizer, pre_tokenizer, decoder, byte_fallback, fuse_unk, unk_token)
    "llama2-legacy": (normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]), None,
                      DECODER + [decoders.Strip(" ", 1, 0)], True, True, "<unk>"),
    "mistral-first": (None, pre_tokenizers.Metaspace(SPACE, "first", split=False),
                      DECODER + [decoders.Strip(" ", 1, 0)], True, True, "<unk>"),
    "always-split-unk": (None, pre_tokenizers.Metaspace(SPACE, "always", split=True),
                         [decoders.Metaspace(SPACE, "always", split=True)], False, False, "<unk>"),
    "never-fused-unk": (None, pre_tokenizers.Metaspace(SPACE, "never", split=False),
                        [decoders.Replace(SPACE, " "), decoders.Fuse()], False, True, "<unk>"),
    "gemma": (normalizers.Replace(" ", SPACE), pre_tokenizers.Split(" ", "merged_with_previous"), DECODER, True,
              True, "<unk>"),
}
# Gemma's vocabulary: <bos> / <eos> control tokens, and plain added tokens HF cuts out of any text (newline and tab
# runs, HTML tags, among them </s> and <s>); "art" is hidden inside the special <start_of_turn> when that is text.
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
GEMMA_PLAIN = ["\n", "\n\n", "\n\n\n", "\t", "\t\t", "<b>", "</b>", "<s>", "</s>", "art"]
# The others get a few plain added tokens too: the text after one is prefixed per the style (legacy Prepend and
# Metaspace "always": every stretch; "first": only the start of the text).
PLAIN = ["[REF]", "<b>", "art"]


def all_splits(vocab, skip):
    """A merge list as transformers makes one from a SentencePiece model: every split of every token into two
    tokens, the tokens in id order (SentencePiece's score order)."""
    return [[t[:k], t[k:]] for t in sorted(vocab, key=vocab.get) if t not in skip
            for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab and t[:k] not in skip and t[k:] not in skip]


def sp_tokenizer(style, merges="learned", whole=False):
    """(tokenizer.json text, HF Tokenizer) trained on CORPUS in a style. Trained on words (a "▁" starts one, as
    SentencePiece splits), or with whole=True on whole texts, so that tokens hold "▁" after other characters.
    Byte-fallback tokens <0x00>..<0xFF> take ids 3..258 as in Llama's vocabulary; limit_alphabet leaves rare
    characters out, so they fall back."""
    normalizer, pre, decoder, byte_fallback, fuse_unk, unk = STYLES[style]
    tok = tokenizers.Tokenizer(models.BPE(unk_token=unk, fuse_unk=fuse_unk, byte_fallback=byte_fallback))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.Sequence(decoder)
    if not whole:
        tok.normalizer, tok.pre_tokenizer = None, pre_tokenizers.Metaspace(SPACE, "always", split=True)
    specials = GEMMA_SPECIAL if style == "gemma" else SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, limit_alphabet=110, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if byte_fallback:
        n = len(specials)
        model["vocab"] = {**{s: i for s, i in model["vocab"].items() if i < n},
                          **{f"<0x{b:02X}>": n + b for b in range(256)},
                          **{s: i + 256 for s, i in model["vocab"].items() if i >= n}}
        for t in spec["added_tokens"]:
            t["id"] = model["vocab"][t["content"]]
    skip = {t["content"] for t in spec["added_tokens"]} | {f"<0x{b:02X}>" for b in range(256)}
    if merges == "converted":
        model["merges"] = all_splits(model["vocab"], skip)
    elif merges == "shuffled":  # every split, in an order that puts one token's merges apart
        model["merges"] = all_splits(model["vocab"], skip)
        random.Random(0).shuffle(model["merges"])
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    hf.add_tokens([tokenizers.AddedToken(s, special=False, normalized=False)
                   for s in (GEMMA_PLAIN if style == "gemma" else PLAIN)])
    hf.encode_special_tokens = True  # our encode() reads special-token strings as text
    return hf.to_str(), hf


CASES = ([(s, m, False) for s in STYLES for m in ("learned", "converted")]
         + [("mistral-first", "shuffled", False), ("gemma", "learned", True), ("mistral-first", "converted", True)])
CASE_IDS = ["-".join(c[:2]) + ("-whole" if c[2] else "") for c in CASES]


def save(path, text, config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(text, encoding="utf-8")
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request, tmp_path_factory):
    """(our Tokenizer, the HF Tokenizer) for one style, merge list and training."""
    text, hf = sp_tokenizer(*request.param)
    return Tokenizer.from_pretrained(save(tmp_path_factory.mktemp("case"), text)), hf


def hf_ids(hf, texts):
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_same_ids_as_hf(case):
    """Multilingual text, emoji, characters outside the vocabulary, runs of spaces, newlines and tabs, text holding
    "▁", special-token spellings (text), leading and trailing spaces and the empty string: HF's ids."""
    ours, hf = case
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert ours.encode_batch(TEXTS) == hf_ids(hf, TEXTS)


def test_fuzz_against_hf(case):
    """Random strings of the pieces where normalising, prefixing, cutting added tokens and fallback interact."""
    ours, hf = case
    rng = random.Random(1)
    texts = ["".join(rng.choices(FUZZ_PIECES, k=rng.randint(1, 20))) for _ in range(600)]
    assert ours.encode_batch(texts) == hf_ids(hf, texts)


def test_decode_as_hf(case):
    """decode() is HF's decoder chain: on encoded text, and on random ids (broken byte runs, control tokens)."""
    ours, hf = case
    for ids in hf_ids(hf, TEXTS):
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    rng = random.Random(2)
    n = hf.get_vocab_size()
    for _ in range(200):
        ids = [rng.randrange(n if rng.random() < 0.5 else min(n, 300)) for _ in range(rng.randint(1, 12))]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), ids


@pytest.mark.parametrize("decoder", [
    decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                       decoders.Strip(" ", 2, 0)]),
    decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Strip(" ", 1, 0), decoders.ByteFallback()]),
    decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(SPACE, "always")]),
    decoders.Metaspace(SPACE, "first"), decoders.Metaspace(SPACE, "never"), None,
], ids=["fuse-strip2", "strip-each", "bytes-metaspace", "metaspace-first", "metaspace-never", "none"])
def test_decoder_chains_as_hf(tmp_path, decoder):
    """Each decoder step as HF runs it, on odd tokens: "▁" runs, spaces, near-byte tokens (<0x4>, <0x+a>, which
    HF's ByteFallback reads as a byte, <0xé>), broken UTF-8 byte runs; no decoder joins tokens with spaces."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for t in [SPACE, SPACE * 2, "a", SPACE + "a", "b" + SPACE, " ", "  x ", "é", "<0xZZ>", "<0x4>", "<0x+a>", "<0xé>"]:
        vocab[t] = len(vocab)
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoder
    ours = Tokenizer.from_pretrained(save(tmp_path, hf.to_str()))
    rng, pool = random.Random(3), [0, 1, 2, 3, 4, *range(200, len(vocab))]
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), ids


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_token_never_made_by_merges(tmp_path, ignore_merges):
    """A token its merges never make (BPE on "abcd" joins b+c first and is stuck at a, bc, d) is not emitted for a
    piece that spells it (tiktoken would look the piece up whole), unless ignore_merges asks HF to look it up."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for t in [SPACE, "a", "b", "c", "d", "bc", "ab", "cd", "abcd"]:
        vocab[t] = len(vocab)
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("c", "d"), ("ab", "cd")],
                                         byte_fallback=True, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, "never", split=False)
    ours = Tokenizer.from_pretrained(save(tmp_path, hf.to_str()))
    for text in ["abcd", "abcd abcd", " abcd", "xabcd", "ab cd", "abc"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert (ours.encode("abcd") == [vocab["abcd"]]) == ignore_merges


def test_token_bytes_count_metaspace_as_one_space(tmp_path):
    """token_bytes / token_byte_lengths (bits per byte): "▁" is the one space byte it decodes to, <0xXX> one byte,
    a control token nothing; the bytes of a text's tokens are its normalised text with spaces."""
    text, hf = sp_tokenizer("llama2-legacy")
    ours = Tokenizer.from_pretrained(save(tmp_path, text))
    lengths = ours.token_byte_lengths()
    vocab = hf.get_vocab()
    assert lengths[vocab[SPACE]] == 1 and lengths[vocab["<0xE2>"]] == 1 and lengths[vocab["<s>"]] == 0
    for t in [t for t in TEXTS if not any(p in t for p in PLAIN)]:  # (the normalizer runs between those)
        ids = ours.encode(t)
        data = b"".join(ours.token_bytes(ids))
        assert data == ours.normalize(t).replace(SPACE, " ").encode("utf-8"), t
        assert lengths[ids].sum() == len(data)


def test_document_ids(tmp_path):
    """Documents are framed by BOS ... EOS: Gemma's <bos> / <eos> (not its HTML tags <s> / </s>), Llama's <s> / </s>."""
    text, hf = sp_tokenizer("gemma")
    gemma = Tokenizer.from_pretrained(save(tmp_path / "g", text, {"bos_token": "<bos>", "eos_token": "<eos>"}))
    assert gemma.document_ids() == (hf.token_to_id("<bos>"), hf.token_to_id("<eos>"))
    text, hf = sp_tokenizer("llama2-legacy")
    llama = Tokenizer.from_pretrained(save(tmp_path / "l", text, {"bos_token": "<s>", "eos_token": "</s>"}))
    assert llama.document_ids() == (hf.token_to_id("<s>"), hf.token_to_id("</s>"))


def test_fingerprint_and_save(tmp_path):
    """The fingerprint (token caches' key) follows the file: a different prefix scheme over the same vocabulary
    changes it; save_pretrained writes the files back byte for byte, and they load to the same ids."""
    text, _ = sp_tokenizer("mistral-first")
    a = Tokenizer.from_pretrained(save(tmp_path / "a", text))
    b = Tokenizer.from_pretrained(save(tmp_path / "b", text.replace('"prepend_scheme":"first"',
                                                                     '"prepend_scheme":"always"')))
    assert a.fingerprint != b.fingerprint and a.encode("x\ny") == b.encode("x\ny")
    a.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").read_text(encoding="utf-8") == text
    c = Tokenizer.from_pretrained(tmp_path / "c")
    assert c.fingerprint == a.fingerprint and c.encode_batch(TEXTS) == a.encode_batch(TEXTS)


def test_transformers_gives_the_same_ids(tmp_path):
    """transformers on the same files: PreTrainedTokenizerFast gives our ids on plain text. Its LlamaTokenizer class
    rebuilds the pipeline as Metaspace (ignoring a legacy Prepend normalizer), which differs only where a stretch of
    text (the text, or the text after an added token) starts with a space or "▁"; there we keep the file's ids, as
    HF tokenizers gives them."""
    transformers = pytest.importorskip("transformers")
    plain = [t for t in TEXTS if not any(s in t for s in ("<s>", "</s>", "<unk>", "<start_of_turn>"))]
    for style in ("llama2-legacy", "mistral-first", "gemma"):
        text, hf = sp_tokenizer(style, "converted")
        path = save(tmp_path / style, text)
        ours = Tokenizer.from_pretrained(path)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        assert [fast.encode(t, add_special_tokens=False) for t in plain] == ours.encode_batch(plain), style
    path = save(tmp_path / "llama", sp_tokenizer("llama2-legacy", "converted")[0],
                {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>"})
    auto, ours = transformers.AutoTokenizer.from_pretrained(path), Tokenizer.from_pretrained(path)
    for t in plain:
        if not t.startswith((" ", SPACE)) and not any(p in t for p in PLAIN):  # (a stretch starts after those)
            assert auto.encode(t, add_special_tokens=False) == ours.encode(t), t
    assert auto.encode(" a", add_special_tokens=False) != ours.encode(" a")  # "▁▁a" from the file, "▁a" rebuilt


def edited(path, edit, style="mistral-first"):
    spec = json.loads(sp_tokenizer(style, "converted")[0])
    edit(spec)
    return save(path, json.dumps(spec))


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda s: s.update(normalizer={"type": "Precompiled", "precompiled_charsmap": "AAA="}), "normalizer"),
    (lambda s: s["pre_tokenizer"].update(replacement="_"), "pre_tokenizer"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer"),
    (lambda s: s.update(pre_tokenizer=None), "neither the normalizer nor the pre_tokenizer"),
    (lambda s: s.update(decoder={"type": "WordPiece", "prefix": "##", "cleanup": True}), "decoder"),
    (lambda s: s["decoder"]["decoders"][-1].update(stop=1), "decoder"),
    (lambda s: s["model"].update(dropout=0.1), "model.dropout"),
    (lambda s: s["model"].update(continuing_subword_prefix="##"), "model.continuing_subword_prefix"),
    (lambda s: s["model"]["vocab"].pop("<0x41>"), "model.byte_fallback is true but model.vocab lacks 1"),
    (lambda s: s["model"].update(unk_token="<nope>"), "model.unk_token"),
    (lambda s: s["model"].update(unk_token=None, byte_fallback=False), "model.byte_fallback is false"),
    (lambda s: s["model"]["merges"].insert(0, ["<0x41>", "<0x42>"]), r"model.merges\[0\]"),
    (lambda s: s["model"].update(ignore_merges=True) or s["pre_tokenizer"].update(split=True), "model.ignore_merges"),
    (lambda s: s["added_tokens"].append({"id": 3, "content": "x", "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": True, "special": False}), "added_tokens"),
])
def test_refuses_what_differs(tmp_path, edit, field):
    """What tiktoken cannot reproduce exactly is a one-line error naming the file and the field."""
    with pytest.raises(ValueError, match=f"tokenizer.json: {field}") as e:
        Tokenizer.from_pretrained(edited(tmp_path, edit))
    assert "\n" not in str(e.value)


def test_refuses_unigram(tmp_path):
    """A SentencePiece Unigram model (T5, ALBERT, XLM-R) is not BPE: refused."""
    tok = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), (SPACE, -1.0), ("a", -2.0)], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer.json: model.type is 'Unigram'"):
        Tokenizer.from_pretrained(tmp_path)


# ---- the real tokenizers, converted by prepare_real_model.py

REAL_ROOT = os.environ.get("SP_TOKENIZERS", os.path.join(REPO, "models"))
REAL = {"mistral-v0.1": "mistral-7b-v0.1-tokenizer", "mistral-v0.3": "mistral-7b-v0.3-tokenizer",
        "gemma3": "gemma3-270m"}
REAL_TEXTS = TEXTS + [
    "The gNodeB hands the UE over to a neighbour cell when its RSRP drops below the threshold.\n\n"
    "VoLTE carries voice over the IMS core; the P-CSCF is the first contact point.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # note\n\tif x != 0:\n\t\tprint(f\"{x:>10}\")\n\n\nclass A: pass\n",
    "Straße, «guillemets», “quotes”, — dashes –, ½ ², ٣٤٥, ๓, ℃, ㎞, Ⅻ, ﬁ, ｆｕｌｌｗｉｄｔｈ",
    "[INST] Hello [/INST] [REFERENCE_DOC_1] <start_of_turn>user\n<table><tr><td>1</td></tr></table>",
    " YYYY", " yyyy", " diffformul", " ::::::::", "YYYY-MM-DD",  # Gemma-3 tokens its merges never make
]


@pytest.fixture(scope="module", params=list(REAL))
def real(request):
    path = os.path.join(REAL_ROOT, REAL[request.param])
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        pytest.skip(f"no {path}/tokenizer.json (python prepare_real_model.py makes it; SP_TOKENIZERS: another root)")
    hf = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    hf.encode_special_tokens = True
    return request.param, path, Tokenizer.from_pretrained(path), hf


def test_real_same_ids_and_decode_as_hf(real):
    """Mistral v0.1 / v0.3 and Gemma-3: HF's ids on multilingual text and random strings, and HF's decode."""
    name, _, ours, hf = real
    rng = random.Random(name)
    texts = REAL_TEXTS + ["".join(rng.choices(FUZZ_PIECES, k=rng.randint(1, 25))) for _ in range(1000)]
    expected = hf_ids(hf, texts)
    assert ours.encode_batch(texts) == expected
    for text, ids in zip(REAL_TEXTS, expected):
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
    assert ours.n_vocab == hf.get_vocab_size()


def test_real_document_ids_and_transformers(real):
    """Documents start with BOS (<s>, Gemma's <bos>) and end with EOS. transformers on the same files gives our ids
    on plain text (text that spells no control token): PreTrainedTokenizerFast always; AutoTokenizer where no text
    starts with a space or "▁" (its LlamaTokenizer rebuilds v0.1's legacy Prepend normalizer as a Metaspace)."""
    transformers = pytest.importorskip("transformers")
    name, path, ours, hf = real
    bos, eos = ("<bos>", "<eos>") if name == "gemma3" else ("<s>", "</s>")
    assert ours.document_ids() == (hf.token_to_id(bos), hf.token_to_id(eos))
    plain = [t for t in REAL_TEXTS if not any(s in t for s in ("<s>", "</s>", "<unk>", "[INST]", "<start_of"))]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
    assert [fast.encode(t, add_special_tokens=False) for t in plain] == ours.encode_batch(plain)
    auto = transformers.AutoTokenizer.from_pretrained(path)
    plain = [t for t in plain if not t.startswith((" ", SPACE))]
    assert [auto.encode(t, add_special_tokens=False) for t in plain] == ours.encode_batch(plain)


# A Mistral-style template written for this test (the prepared tokenizers carry none): [INST] and [/INST] are control
# tokens in v0.3, and the text between them starts stretches that are not at the start of the input.
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST]' + m['content'] + "
                 "'[/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = os.path.join(REPO, "data", "chat_templates", "gemma.jinja")


def test_real_chat_rendering_as_transformers(real):
    """render_chat on a SentencePiece-style tokenizer gives apply_chat_template's ids: text after a control token
    gets the metaspace prefix only where HF gives it (Metaspace "first": at the start of the input alone; v0.1's
    legacy Prepend and Gemma: as each style does)."""
    transformers = pytest.importorskip("transformers")
    from chat import render_chat
    name, path, ours, _ = real
    template = open(GEMMA_TEMPLATE).read() if name == "gemma3" else INST_TEMPLATE
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"),
                                                bos_token=ours.special_tokens_map.get("bos_token", "<s>"),
                                                eos_token=ours.special_tokens_map.get("eos_token", "</s>"))
    ours.chat_template = template
    messages = [{"role": "user", "content": "Why does my 5G signal drop indoors?"},
                {"role": "assistant", "content": "Walls absorb the higher bands. Try Wi-Fi calling."},
                {"role": "user", "content": "요금제는요? 🙂"}]
    expected = fast.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert render_chat(ours, messages, add_generation_prompt=True)[0] == expected
