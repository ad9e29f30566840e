"""Data for DACP: the tokenizer; later sections below it: corpus -> token shards, the replay-mixed token stream,
chat rendering with a loss mask, and SFT batches.

The tokenizer is tiktoken under the hood. A checkpoint's tokenizer.json (byte-level BPE in the GPT-2, Llama-3, Qwen2
or SmolLM2 style) becomes a tiktoken Encoding that gives the same ids as HF tokenizers; anything tiktoken cannot
reproduce exactly is refused, with an error naming the file and the field. Tokenizer.train is a small byte-level
BPE trainer for from-scratch models, and save_pretrained writes files that transformers loads with the same ids.
"""
import hashlib
import heapq
import itertools
import json
import math
import os
import re
import unicodedata
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Tokenizer

# GPT-2's split regex: HF ByteLevel(use_regex=true) uses exactly this one (so does tiktoken's "gpt2").
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# SmolLM2's Sequence[Digits(individual_digits), ByteLevel(use_regex)] as one regex. HF first cuts out every digit on
# its own, then runs the GPT-2 regex on each piece in between. So a digit is always alone (`\p{N}`, no leading space),
# and a whitespace run right before a digit ends its piece, where GPT-2's `\s+(?!\S)` takes all of it; on unsplit
# text `\s+(?!\S)` would leave the last space out ("a  1": HF gives "a", "  ", "1", not "a", " ", " ", "1"). Hence
# `\s+(?=\p{N})` before it.
SMOLLM2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""

# Llama-3's split regex (tiktoken's cl100k_base without possessive quantifiers); what Tokenizer.train saves.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The trainer splits text with Python's `re`, which has no \p{L} / \p{N}, so this approximates LLAMA3_PATTERN: a
# letter is a word character that is not a decimal digit or "_", a number is a decimal digit. That only changes which
# merges are learned, never whether encode() matches HF: encoding always splits with the exact saved pattern.
TRAIN_SPLIT = re.compile(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}"""
                         r"""| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# A trained tokenizer's special tokens: the first is end-of-text, the document separator (eos); the ChatML pair
# delimits chat turns (Qwen2.5's simple template below, and render_chat).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   r"'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   r"{% endif %}")
# The files save_pretrained copies from a checkpoint's directory (config.json etc. are model.py's business).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py), the alphabet byte-level BPE vocabularies
    are written in: printable Latin-1 bytes stand for themselves, the other 68 become U+0100.. ("Ġ" is a space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


BYTE_TO_CHAR = bytes_to_unicode()
_UNBYTE = str.maketrans({c: chr(b) for b, c in BYTE_TO_CHAR.items()})  # to Latin-1, one char per byte: C speed


def token_to_bytes(s):
    return s.translate(_UNBYTE).encode("latin-1")  # "Ġthe" -> b" the"


def bytes_to_token(b):
    return "".join(BYTE_TO_CHAR[x] for x in b)  # b" the" -> "Ġthe"


# ---- reading tokenizer.json: everything tiktoken cannot reproduce exactly is refused


def _read_json(file):
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _check_bpe_model(model, file):
    kind = model.get("type", "BPE" if "merges" in model else None)  # very old files leave the type out
    if kind != "BPE":
        raise ValueError(f"{file}: model.type is {kind!r}; only byte-level 'BPE' is supported "
                         "(Unigram / SentencePiece, WordPiece and WordLevel tokenizers cannot be run by tiktoken)")
    for field in ["byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"]:
        if model.get(field):  # SentencePiece's <0xNN> fallback, word-piece affixes, random merge dropout
            raise ValueError(f"{file}: model.{field} is {model[field]!r}; tiktoken's byte-level BPE has no such "
                             "thing, so ids would differ from HF")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ValueError(f"{file}: model.vocab (a dict) and model.merges (a list) are required for BPE")


def _uses_nfc(normalizer, file):
    """Null or NFC (alone, or in a Sequence as Qwen2 has it); NFC is applied in Python before tiktoken sees text."""
    if normalizer is None:
        return False
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [s.get("type") for s in steps]
    if any(k != "NFC" for k in kinds):
        raise ValueError(f"{file}: normalizer {kinds} is not supported; only null or NFC")
    return bool(kinds)


def _split_pattern(pre, file):
    """The tiktoken split regex that does what the tokenizer.json pre_tokenizer does."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if s else None for s in steps]
    byte_level = steps[-1] if kinds[-1:] == ["ByteLevel"] else {}
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{file}: pre_tokenizer ByteLevel.add_prefix_space is true (a space is put before the "
                         "text); tiktoken does not do that, so ids would differ from HF")
    use_regex = byte_level.get("use_regex", True)  # files from before the option existed always used the regex
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        if "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and use_regex:
        return SMOLLM2_PATTERN
    raise ValueError(f"{file}: pre_tokenizer {json.dumps(pre)[:300]} is not supported. Supported: "
                     "ByteLevel(use_regex=true) (GPT-2); Sequence[Split(Regex, behavior=Isolated, invert=false), "
                     "ByteLevel(use_regex=false)] (Llama-3, Qwen2); Sequence[Digits(individual_digits=true), "
                     "ByteLevel(use_regex=true)] (SmolLM2); all with add_prefix_space=false")


def _mergeable_ranks(model, added, file):
    """tiktoken's mergeable ranks: each vocab token's bytes -> its id (added tokens become special tokens instead)."""
    tokens = [s for s in model["vocab"] if s not in added]  # GPT-2 has <|endoftext|> in both; it is special here
    strays = set("".join(tokens)) - set(BYTE_TO_CHAR.values())
    if strays:
        raise ValueError(f"{file}: model.vocab has characters outside GPT-2's byte-to-unicode alphabet "
                         f"{sorted(strays)[:5]}; this is not a byte-level BPE vocabulary")
    ranks = {token_to_bytes(s): model["vocab"][s] for s in tokens}
    ids = set(ranks.values())
    if len(ids) != len(ranks):
        raise ValueError(f"{file}: model.vocab gives the same id to two tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{file}: model.vocab lacks {len(missing)} of the 256 single-byte tokens (e.g. byte "
                         f"0x{missing[0]:02x}, written {BYTE_TO_CHAR[missing[0]]!r}); byte-level BPE needs all of "
                         "them so that any text can be encoded")
    for s, i in added.items():
        if i in ids:
            raise ValueError(f"{file}: added_tokens {s!r} has id {i}, which model.vocab gives to another token")
    return ranks


def _check_merges(model, ranks, file):
    """HF applies merges in merge-list order; tiktoken merges the adjacent pair whose concatenation has the lowest
    id. They agree when every merge yields the concatenation of its parts, that token is in the vocab, and merged ids
    never go down along the list. They may repeat, and a part may have a higher id than the result: Llama-3's list
    (converted from tiktoken by transformers) holds every split of every token. With ignore_merges false HF emits
    only tokens some merge produces, while tiktoken looks a whole piece up first, so all must be produced."""
    vocab = model["vocab"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]  # "a b" (older files) or ["a", "b"]
    ids = [vocab.get(p[0] + p[1], -1) if len(p) == 2 and p[0] in vocab and p[1] in vocab else -1 for p in pairs]
    bad = np.flatnonzero(np.diff(ids, prepend=0) < 0)  # a step down; a broken merge (-1) is one too
    if len(bad):
        n = bad[0]
        raise ValueError(f"{file}: model.merges[{n}] {model['merges'][n]!r}: "
                         f"{_merge_problem(pairs[n], vocab, ids[n - 1] if n else 0)}")
    if not model.get("ignore_merges", False):
        produced = set(ids)
        for token, i in ranks.items():
            if len(token) > 1 and i not in produced:
                raise ValueError(f"{file}: model.vocab token {bytes_to_token(token)!r} (id {i}) is produced by no "
                                 "merge and model.ignore_merges is false, so HF never emits it but tiktoken would")


def _merge_problem(parts, vocab, prev):
    if len(parts) != 2:
        return "not two tokens"
    for part in parts:
        if part not in vocab:
            return f"{part!r} is not in model.vocab"
    merged = "".join(parts)
    if merged not in vocab:
        return f"the merged token {merged!r} is not in model.vocab"
    return (f"yields id {vocab[merged]} after a merge that yields id {prev}; the merge order disagrees with the "
            "vocab ids, which tiktoken uses as merge ranks")


# ---- BPE training helpers


def _pop_most_frequent(heap, pair_count):
    """Pop the pair with the highest current count off the lazy heap (None when no pairs are left)."""
    while heap:
        neg, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if count == -neg:
            return pair
        if count > 0:  # stale: the pair got rarer since it was pushed; put it back at its true count
            heapq.heappush(heap, (-count, pair))
    return None


def _merge(word, pair, new_id, f, pair_count):
    """Replace each occurrence of pair in word, left to right, by new_id ("aaa" with (a, a) -> [aa, a]), and move
    the counts of the neighbouring pairs (f per occurrence): (left, a) becomes (left, new), (b, right) becomes
    (new, right). The left neighbour is read from the output, so back-to-back merges ("abab") come out right.
    Returns the new word and the pairs with new_id it made."""
    a, b = pair
    out, born, i, n = [], [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            if out:
                pair_count[out[-1], a] -= f
                pair_count[out[-1], new_id] += f
                born.append((out[-1], new_id))
            if i + 2 < n:
                pair_count[b, word[i + 2]] -= f
                pair_count[new_id, word[i + 2]] += f
                born.append((new_id, word[i + 2]))
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out, born


def _write_atomic(file, data):
    """Write to a temporary name, then rename, so a crash never leaves a half-written file behind."""
    tmp = file.with_name(f"{file.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, file)


class Tokenizer:
    """Byte-level BPE on tiktoken: encode(text) -> ids, adding no BOS/EOS and reading special-token strings in the
    text as plain text (so data can't inject control tokens); decode(ids) -> text."""

    def __init__(self, mergeable_ranks, special_tokens, pattern, *, nfc=False, eos_id=None, bos_id=None,
                 chat_template=None, merges=None, source=None, name="bpe"):
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens)
        self.mergeable_ranks = mergeable_ranks  # bytes -> id
        self.special_tokens = special_tokens  # str -> id, e.g. {"<|im_start|>": 151644}, for render_chat
        self.pattern, self.nfc = pattern, nfc
        self.eos_id, self.bos_id = eos_id, bos_id
        self.chat_template = chat_template  # the checkpoint's Jinja chat template, or None
        self.merges = merges  # [(id_a, id_b), ...] in merge order, for a trained tokenizer
        self.source = source  # the HF directory it was loaded from, whose files save_pretrained copies

    @property
    def n_vocab(self):
        return self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(self.normalize(text))

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch([self.normalize(t) for t in texts])  # on tiktoken's thread pool

    def normalize(self, text):
        """NFC, where the tokenizer.json asks for it. ASCII text is already NFC, and str.isascii() is O(1)."""
        return unicodedata.normalize("NFC", text) if self.nfc and not text.isascii() else text

    @property
    def fingerprint(self):
        """A hash of everything that decides the ids: token shards cached under one tokenizer are not reused by
        another."""
        h = hashlib.sha256(f"{self.pattern}\0{self.nfc}\0{self.eos_id}\0{self.bos_id}\0".encode())
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + token)
        h.update(json.dumps(sorted(self.special_tokens.items())).encode())
        return h.hexdigest()

    def token_byte_lengths(self):
        """UTF-8 bytes each id stands for, as an int array [n_vocab] (special tokens: 0), for bits per byte."""
        lengths = np.zeros(self.n_vocab, dtype=np.int64)
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    def decode(self, ids):
        return self.enc.decode(ids)  # a cut multi-byte char becomes U+FFFD, as in HF's ByteLevel decoder

    @classmethod
    def from_pretrained(cls, path):
        """An HF tokenizer directory: tokenizer.json, and optionally tokenizer_config.json and generation_config.json
        (eos / bos, chat template)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: not found; Tokenizer.from_pretrained needs an HF tokenizer directory "
                                    "with a tokenizer.json holding a byte-level BPE")
        spec = _read_json(file)
        model = spec.get("model")
        if not isinstance(model, dict):
            raise ValueError(f"{file}: no 'model' object")
        _check_bpe_model(model, file)
        nfc = _uses_nfc(spec.get("normalizer"), file)
        pattern = _split_pattern(spec.get("pre_tokenizer"), file)
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        ranks = _mergeable_ranks(model, added, file)
        _check_merges(model, ranks, file)

        config_file, gen_file = path / "tokenizer_config.json", path / "generation_config.json"
        config, gen = _read_json(config_file), _read_json(gen_file)

        def token_id(key):
            """tokenizer_config.json's eos_token / bos_token (a string or {"content": ...}), else
            generation_config.json's eos_token_id / bos_token_id (an int, or a list: the first), else None."""
            token = config.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None:
                i = added.get(token, model["vocab"].get(token))
                if i is None:
                    raise ValueError(f"{config_file}: {key}_token {token!r} is in neither added_tokens nor "
                                     f"model.vocab of {file}")
                return i
            i = gen.get(f"{key}_token_id")
            i = (i or [None])[0] if isinstance(i, list) else i
            if i is not None and not isinstance(i, int):
                raise ValueError(f"{gen_file}: {key}_token_id is {i!r}, not an int or a list of ints")
            return i

        template = config.get("chat_template")
        if isinstance(template, list):  # older form: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():  # where newer transformers save it
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        eos_id, bos_id = token_id("eos"), token_id("bos")
        try:
            return cls(ranks, added, pattern, nfc=nfc, eos_id=eos_id, bos_id=bos_id, chat_template=template,
                       source=path, name=path.name or "bpe")
        except ValueError as e:  # e.g. a Split regex that tiktoken's engine (fancy-regex) cannot compile
            raise ValueError(f"{file}: pre_tokenizer regex {pattern!r}: tiktoken refused it: {e}") from None

    @classmethod
    def train(cls, texts, vocab_size, special_tokens=SPECIAL_TOKENS):
        """Byte-level BPE (Sennrich et al. 2016; on bytes as in GPT-2) trained on an iterable of strings.
        Ids: 0-255 are the bytes in byte order (as in tiktoken), then one id per merge in merge order, then the
        special tokens, the first of which is eos. vocab_size counts all three, so n_vocab == vocab_size (less only
        when the text runs out of pairs to merge)."""
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} < 256 bytes + {len(special_tokens)} special tokens")
        texts = [texts] if isinstance(texts, str) else texts

        # Each distinct chunk once, with its count: merges never cross chunks, so equal chunks merge alike.
        chunk_counts = Counter()
        for text in texts:
            chunk_counts.update(TRAIN_SPLIT.findall(unicodedata.normalize("NFC", text)))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs = list(chunk_counts.values())

        # Pair statistics, updated incrementally: pair -> count, pair -> indices of the words that hold it (or did:
        # a stale index is harmless, merging there changes nothing). The max-heap is lazy: it may hold stale
        # counts, which are checked when popped.
        pair_count, where = defaultdict(int), defaultdict(set)
        for i, (word, f) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                pair_count[pair] += f
                where[pair].add(i)
        heap = [(-c, pair) for pair, c in pair_count.items()]  # most frequent first; ties: the smaller ids first
        heapq.heapify(heap)

        vocab = [bytes([b]) for b in range(256)]  # id -> bytes
        merges = []
        for _ in tqdm(range(n_merges), desc="BPE merges", disable=None):
            pair = _pop_most_frequent(heap, pair_count)
            if pair is None:
                break  # every chunk is one token already
            new_id = len(vocab)
            vocab.append(vocab[pair[0]] + vocab[pair[1]])
            merges.append(pair)
            new_pairs = set()  # pairs with the new token: the only counts that grow, so the only heap pushes
            for i in where.pop(pair):  # rewrite only the words that hold the pair
                words[i], born = _merge(words[i], pair, new_id, freqs[i], pair_count)
                for p in born:
                    where[p].add(i)
                new_pairs.update(born)
            del pair_count[pair]
            for p in new_pairs:
                if pair_count[p] > 0:  # it can be gone again: "abab" makes (ab, a), then (ab, ab)
                    heapq.heappush(heap, (-pair_count[p], p))
        # Can't happen: once some bytes are merged into a token, they never show up split another way.
        assert len(set(vocab)) == len(vocab), "BPE trainer produced a duplicate token"

        specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
        chatml = "<|im_start|>" in specials and "<|im_end|>" in specials
        return cls({b: i for i, b in enumerate(vocab)}, specials, LLAMA3_PATTERN, nfc=True,
                   eos_id=specials[special_tokens[0]] if specials else None,
                   chat_template=CHATML_TEMPLATE if chatml else None, merges=merges)

    def save_pretrained(self, path, model_max_length=2048):
        """Write tokenizer.json and tokenizer_config.json that transformers.AutoTokenizer and tokenizers load with
        the same ids. A tokenizer loaded from an HF directory copies that directory's tokenizer files: exact."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.source is not None:
            for name in TOKENIZER_FILES:
                if (self.source / name).is_file():
                    _write_atomic(path / name, (self.source / name).read_bytes())
            return
        if self.merges is None:
            raise ValueError("save_pretrained needs a tokenizer from Tokenizer.train or Tokenizer.from_pretrained")

        token = {i: bytes_to_token(b) for b, i in self.mergeable_ranks.items()}  # id -> vocab string
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        spec = {  # laid out like Qwen2's tokenizer.json
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in self.special_tokens.items()],
            "normalizer": {"type": "NFC"} if self.nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {**byte_level, "trim_offsets": True}]},
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True,  # tiktoken looks a whole piece up in the vocab before merging
                      "vocab": {token[i]: i for i in sorted(token)},
                      "merges": [[token[a], token[b]] for a, b in self.merges]},
        }
        special = {i: s for s, i in self.special_tokens.items()}
        eos = special.get(self.eos_id)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos,
            "bos_token": special.get(self.bos_id),
            "pad_token": eos,  # padding is masked out of the loss anyway
            "additional_special_tokens": [s for s in self.special_tokens if s != eos],
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        for name, obj in [("tokenizer.json", spec), ("tokenizer_config.json", config)]:
            _write_atomic(path / name, json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8"))


# -----------------------------------------------------------------------------
# Corpora and token shards
#
# A domain is a folder data/<domain>/ with train/ and val/ (DESIGN.md). A .txt file is one document; a .jsonl file
# has one document per row, {"text": ...}. Documents are joined as [bos] doc [eos] (bos only where the tokenizer has
# one), so the model learns where documents end. Tokenised corpora are cached as one flat .bin of uint16 (uint32 for
# vocabularies over 65536) per split, read back through np.memmap: a corpus never has to fit in memory.


def find_domains(data_root):
    if not os.path.isdir(data_root):
        return []
    return sorted(d for d in os.listdir(data_root) if os.path.isdir(os.path.join(data_root, d, "train")))


def corpus_files(data_root, domain, split):
    if domain not in find_domains(data_root):
        found = ", ".join(find_domains(data_root)) or "none"
        raise ValueError(f"unknown domain {domain!r}: no {os.path.join(data_root, domain, 'train')}/ "
                         f"(domains found in {data_root}: {found})")
    folder = os.path.join(data_root, domain, split)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".txt", ".jsonl"))) \
        if os.path.isdir(folder) else []
    if not files:
        raise ValueError(f"{folder}/: no .txt or .jsonl files")
    return files


def read_jsonl(path):
    """Yield ("file:line", row) for each non-blank line of a .jsonl file; a line that is not a JSON object is an
    error naming its file and line (callers check the row's keys and name the place the same way)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield f"{path}:{lineno}", row


def read_documents(files):
    """Yield the documents of these files one at a time (never the whole corpus in memory)."""
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
            continue
        for where, row in read_jsonl(path):
            if not isinstance(row.get("text"), str):
                raise ValueError(f'{where}: expected a row {{"text": <string>}}')
            yield row["text"]


def tokenize_corpus(tokenizer, data_root, domain, split, batch_bytes=8 << 20):
    """The token stream of data/<domain>/<split> as a read-only np.memmap, from the cache when the tokenizer and the
    files (name, size, mtime) are unchanged; otherwise tokenised in batches of documents with tiktoken's
    multi-threaded batch encoder, streamed to disk, and renamed into place when complete."""
    files = corpus_files(data_root, domain, split)
    key = hashlib.sha256(tokenizer.fingerprint.encode())
    for path in files:
        st = os.stat(path)
        key.update(f"{os.path.relpath(path, data_root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    dtype = np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32
    cache = os.path.join(data_root, domain, ".tokens")
    bin_path = os.path.join(cache, f"{split}-{key.hexdigest()[:16]}.bin")
    if os.path.exists(bin_path):
        return np.memmap(bin_path, dtype=dtype, mode="r")

    os.makedirs(cache, exist_ok=True)
    total = sum(os.path.getsize(p) for p in files)
    n_tokens = 0
    with open(bin_path + ".tmp", "wb") as out, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {domain}/{split}") as bar:
        def flush(docs):
            nonlocal n_tokens
            ids = tokenizer.encode_batch(docs)
            lengths = np.array([len(d) for d in ids])
            arr = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=lengths.sum())
            ends = np.cumsum(lengths)
            arr = np.insert(arr, ends, tokenizer.eos_id)  # doc eos doc eos ... (numpy, not per-token Python)
            if tokenizer.bos_id is not None:  # document i now starts at its old start + i
                arr = np.insert(arr, ends - lengths + np.arange(len(ids)), tokenizer.bos_id)
            arr.tofile(out)
            n_tokens += len(arr)
            bar.update(sum(len(d.encode("utf-8")) for d in docs))

        docs, size = [], 0
        for doc in read_documents(files):
            if doc.strip():
                docs.append(doc)
                size += len(doc)
            if size >= batch_bytes:
                flush(docs)
                docs, size = [], 0
        if docs:
            flush(docs)
    if n_tokens == 0:
        os.remove(bin_path + ".tmp")
        raise ValueError(f"{os.path.join(data_root, domain, split)}/: the corpus is empty")
    os.replace(bin_path + ".tmp", bin_path)
    for name in os.listdir(cache):  # drop this split's stale caches (other tokenizer or older text)
        if name.startswith(f"{split}-") and name.endswith(".bin") and name != os.path.basename(bin_path):
            os.remove(os.path.join(cache, name))
    return np.memmap(bin_path, dtype=dtype, mode="r")


# -----------------------------------------------------------------------------
# The replay mixture (ixi-GEN's pseudo-replay; Ibrahim et al. 2024)


class WindowSampler:
    """Training windows of seq_len + 1 tokens (inputs and shifted targets) from one token stream, at offsets
    0, seq_len, 2 seq_len, ...; the k-th window drawn is a pure function of (seed, k): a seeded permutation of all
    windows per epoch, so every window is seen once per epoch and resuming needs only k."""

    def __init__(self, tokens, seq_len, seed):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"a corpus of {len(tokens)} tokens is shorter than one window of seq_len + 1 tokens")
        self._perm = (None, None)

    def permutation(self, epoch):
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def take(self, k0, count):
        """Windows k0 .. k0 + count - 1, as an int64 array [count, seq_len + 1]."""
        rows = []
        for k in range(k0, k0 + count):
            start = int(self.permutation(k // self.n_windows)[k % self.n_windows]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len + 1])
        return np.stack(rows).astype(np.int64) if rows else np.zeros((0, self.seq_len + 1), dtype=np.int64)


class ReplayMixture:
    """DACP batches: each global batch of batch_size sequences takes replay_ratio of them from the general (replay)
    corpus and the rest from the domain corpus. The replay count of step s is floor((s+1) B r) - floor(s B r), so
    the fraction is exact over the run (the remainder carries from batch to batch). The global batch of step s is
    a pure function of (seed, step): any number of processes sees the same data, and resuming needs only the step."""

    def __init__(self, domain_tokens, replay_tokens, seq_len, batch_size, replay_ratio, seed):
        if not 0 <= replay_ratio <= 1:
            raise ValueError(f"--replay-ratio must be in [0, 1], got {replay_ratio}")
        self.ratio = Fraction(replay_ratio).limit_denominator(10**6)  # exact integer arithmetic below
        self.batch_size, self.seed = batch_size, seed
        self.domain = WindowSampler(domain_tokens, seq_len, seed) if self.ratio < 1 else None
        self.replay = WindowSampler(replay_tokens, seq_len, seed + 1) if self.ratio > 0 else None

    def n_replay_before(self, step):
        return math.floor(step * self.batch_size * self.ratio)

    def batch(self, step):
        """The global batch of this step: int64 [batch_size, seq_len + 1], domain and replay rows interleaved."""
        r0, r1 = self.n_replay_before(step), self.n_replay_before(step + 1)
        d0 = step * self.batch_size - r0
        parts = []
        if self.domain is not None:
            parts.append(self.domain.take(d0, self.batch_size - (r1 - r0)))
        if self.replay is not None:
            parts.append(self.replay.take(r0, r1 - r0))
        rows = np.concatenate(parts)
        return rows[np.random.default_rng([self.seed, step]).permutation(len(rows))]


# -----------------------------------------------------------------------------
# Chat rendering
#
# SFT trains on conversations rendered in the checkpoint's own chat format, so the fine-tuned model speaks the format
# its tokenizer_config.json advertises and transformers' apply_chat_template reproduces. Two formats cover the
# supported families: ChatML (Qwen2.5, Qwen3, SmolLM2, and the project's own tokenizers) and Llama-3's headers. The
# loss mask is true exactly on each assistant message's content and its end-of-turn token (nanochat's
# render_conversation): the model learns to answer and to stop, never to imitate the user or the system prompt.

ROLES = ("system", "user", "assistant")


def chat_format(tokenizer):
    """'llama3' or 'chatml', from the special tokens and the chat template; None when the tokenizer has neither."""
    specials, template = tokenizer.special_tokens, tokenizer.chat_template or ""
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials and "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        return "chatml"
    return None


def end_of_turn_id(tokenizer):
    """The token that ends an assistant turn (<|im_end|> or <|eot_id|>): a chat model's stop token."""
    fmt = chat_format(tokenizer)
    return None if fmt is None else tokenizer.special_tokens["<|eot_id|>" if fmt == "llama3" else "<|im_end|>"]


def check_messages(messages):
    """Raise ValueError saying what is wrong with a {"messages": [...]} conversation (the HF / OpenAI format)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected "messages": a non-empty list of {"role": ..., "content": ...}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string, got "
                             f"{type(m.get('content')).__name__}")


def render_chat(tokenizer, messages, add_generation_prompt=False):
    """Conversation -> (ids, mask), the same ids as apply_chat_template(messages) for this tokenizer's format.

    Special tokens are inserted as ids and the text between them is encoded as one piece, as HF does (it splits
    special tokens out first), so BPE merges across "role\\n" + content exactly as in the reference. The mask
    marks the content's tokens: those after the longest common prefix with the header-only encoding."""
    check_messages(messages)
    fmt = chat_format(tokenizer)
    if fmt is None:
        raise ValueError(f"tokenizer {tokenizer.source or ''}: no chat format (needs <|im_start|>/<|im_end|> or "
                         "Llama-3's <|start_header_id|>/<|eot_id|> special tokens)")
    sp = tokenizer.special_tokens
    ids, mask = [], []

    def add(tokens, trained):
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    def add_text(header, content, trained):  # header + content as one encode; train on the content's tokens
        tokens, head = tokenizer.encode(header + content), tokenizer.encode(header)
        n = next((i for i, (a, b) in enumerate(zip(tokens, head)) if a != b), min(len(tokens), len(head)))
        add(tokens[:n], False)
        add(tokens[n:], trained)

    if fmt == "chatml":  # <|im_start|>role\ncontent<|im_end|>\n
        for m in messages:
            trained = m["role"] == "assistant"
            add([sp["<|im_start|>"]], False)
            add_text(m["role"] + "\n", m["content"], trained)
            add([sp["<|im_end|>"]], trained)
            add(tokenizer.encode("\n"), False)
        if add_generation_prompt:
            add([sp["<|im_start|>"]] + tokenizer.encode("assistant\n"), False)
    else:  # <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent.strip()<|eot_id|>
        if tokenizer.bos_id is not None:
            add([tokenizer.bos_id], False)
        for m in messages:
            trained = m["role"] == "assistant"
            add([sp["<|start_header_id|>"]] + tokenizer.encode(m["role"]) + [sp["<|end_header_id|>"]], False)
            add_text("\n\n", m["content"].strip(), trained)  # Llama-3's template trims each message
            add([sp["<|eot_id|>"]], trained)
        if add_generation_prompt:
            add([sp["<|start_header_id|>"]] + tokenizer.encode("assistant") + [sp["<|end_header_id|>"]]
                + tokenizer.encode("\n\n"), False)
    return ids, mask


def read_conversations(path):
    """The conversations of a .jsonl file, [(messages, "file:line"), ...]; a malformed row is an error naming its
    file and line (SFT rows need at least one assistant turn: nothing else is trained)."""
    rows = []
    for where, row in read_jsonl(path):
        if "messages" not in row:
            raise ValueError(f'{where}: expected a row {{"messages": [...]}}')
        try:
            check_messages(row["messages"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise ValueError(f"{where}: no assistant message, so nothing to train on")
        rows.append((row["messages"], where))
    if not rows:
        raise ValueError(f"{path}: no conversations")
    return rows


# -----------------------------------------------------------------------------
# SFT batches: a curriculum of stages
#
# SOAEsV2's domain-progressive SFT trains stage by stage (weakly related conversations first, expert domain data
# last), each stage for its own epochs. A conversation is one row, right-padded to the longest row of its batch:
# padding sits after the real tokens, so causal attention never lets a conversation see another one, and its
# labels are IGNORE, so it carries no loss. To keep padding small, rows are sorted by length inside shuffled pools
# of a few batches ("length bucketing") and the batches of a pool are then shuffled again.

IGNORE = -100  # the label of an untrained position (F.cross_entropy's ignore_index)


def sft_row(tokenizer, messages, seq_len):
    """(ids, labels) for one conversation: labels are the next token where the mask trains it, else IGNORE;
    cut to seq_len + 1 tokens (returns the row and whether it was cut)."""
    ids, mask = render_chat(tokenizer, messages)
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    cut = len(ids) > seq_len + 1
    return ids[:seq_len + 1], labels[:seq_len], cut


class Curriculum:
    """The batches of an SFT run. stages: [(name, rows, epochs)] with rows [(ids, labels)]. Step s's global batch
    is a pure function of (seed, s): batch(s) -> int64 [batch_size, 2, width] (ids[:-1] and labels, stacked), so a
    resumed run sees exactly the batches it would have seen. single_stage=True pools every stage's epochs into one
    shuffled stage: SOAEsV2's ablation baseline (the same examples, no order)."""

    def __init__(self, stages, batch_size, seed, single_stage=False, pool_batches=8, pad_id=0):
        self.batch_size, self.pad_id = batch_size, pad_id
        rng = np.random.default_rng(seed)
        plan = []  # per stage: the row order over all its epochs
        for name, rows, epochs in stages:
            order = np.concatenate([rng.permutation(len(rows)) for _ in range(epochs)])
            plan.append((name, rows, order))
        if single_stage:
            rows = [r for _, rs, order in plan for r in (rs[i] for i in order)]
            plan = [("+".join(name for name, _, _ in plan), rows, rng.permutation(len(rows)))]
        self.stages, self.batches = [], []  # stages: (name, first step, number of steps)
        for name, rows, order in plan:
            steps = math.ceil(len(order) / batch_size)
            order = np.concatenate([order, order[:steps * batch_size - len(order)]])  # fill the last batch
            self.stages.append((name, len(self.batches), steps))
            pool = pool_batches * batch_size
            for p0 in range(0, len(order), pool):
                chunk = sorted(order[p0:p0 + pool], key=lambda i: len(rows[i][0]))  # bucket by length
                batches = [[rows[i] for i in chunk[b:b + batch_size]] for b in range(0, len(chunk), batch_size)]
                self.batches += [batches[j] for j in rng.permutation(len(batches))]
        self.n_trained = [sum(sum(t != IGNORE for t in labels) for _, labels in b) for b in self.batches]

    def __len__(self):
        return len(self.batches)

    def stage_of(self, step):
        """(index, name, first step, steps) of the stage this step belongs to."""
        for k, (name, first, steps) in enumerate(self.stages):
            if step < first + steps:
                return k, name, first, steps
        raise IndexError(f"step {step} is past the curriculum's {len(self)} steps")

    def padding(self):
        """Fraction of the batches' positions that are padding (what bucketing keeps small)."""
        real = sum(len(labels) for b in self.batches for _, labels in b)
        total = sum(max(len(labels) for _, labels in b) * len(b) for b in self.batches)
        return 1 - real / total

    def batch(self, step):
        return pad_rows(self.batches[step], self.pad_id)


def pad_rows(rows, pad_id):
    """[(ids, labels)] -> int64 [len(rows), 2, width]: inputs ids[:-1] and labels, right-padded (pad_id, IGNORE) to
    the longest row."""
    width = max(len(labels) for _, labels in rows)
    out = np.full((len(rows), 2, width), IGNORE, dtype=np.int64)
    out[:, 0] = pad_id
    for r, (ids, labels) in enumerate(rows):
        out[r, 0, :len(ids) - 1] = ids[:-1]
        out[r, 1, :len(labels)] = labels
    return out
