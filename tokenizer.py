"""The tokenizer: BPE on tiktoken, with the same ids as a checkpoint's HF tokenizer.

A checkpoint's tokenizer.json becomes a tiktoken Encoding that gives the same ids as HF tokenizers: byte-level BPE in
the GPT-2, Llama-3, Qwen2 or SmolLM2 style (here, also for vocabularies that lack some single bytes, which HF drops),
and SentencePiece-style BPE with byte fallback in the Llama-2, Mistral and Gemma style (sentencepiece_bpe.py);
anything tiktoken cannot reproduce exactly is refused, with an error naming the file and the field.
Tokenizer.train is a small byte-level BPE trainer for from-scratch models (bpe_train.py), and save_pretrained writes
files that transformers loads with the same ids.

    tokenizer = Tokenizer.from_pretrained("path/to/Qwen2.5-0.5B")     # tokenizer.json (+ tokenizer_config.json)
    ids = tokenizer.encode("Hello world")                             # no BOS/EOS added
    tokenizer = Tokenizer.train(texts, vocab_size=4096)               # from scratch, ChatML special tokens
    tokenizer.save_pretrained("out/run")                              # transformers.AutoTokenizer loads it
"""
import hashlib
import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken

from bpe_train import train_bpe
from files import read_json, write_atomic
from sentencepiece_bpe import SentencePieceBPE, is_sentencepiece_style

# -----------------------------------------------------------------------------
# Split patterns, byte alphabet

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

# A trained tokenizer's special tokens: the first is end-of-text, the document separator (eos); the ChatML pair
# delimits chat turns (Qwen2.5's simple template below, and render_chat).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   r"'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   r"{% endif %}")
# End-of-text tokens that separate pretraining documents, each with the begin-of-text token its family puts before
# a document (None: no such token). See Tokenizer.document_ids.
END_OF_TEXT = (("<|endoftext|>", None), ("<|end_of_text|>", "<|begin_of_text|>"), ("<eos>", "<bos>"),
               ("</s>", "<s>"))  # (Gemma's vocabulary also has </s> and <s>: HTML tags, so <eos> comes first)
# tokenizer_config.json's named special tokens: apply_chat_template passes them to the template (bos_token, ...).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
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


def _check_model_type(model, file):
    kind = model.get("type", "BPE" if "merges" in model else None)  # very old files leave the type out
    if kind != "BPE":
        raise ValueError(f"{file}: model.type is {kind!r}; only 'BPE' is supported, byte-level or SentencePiece-style "
                         "(Unigram, WordPiece and WordLevel tokenizers cannot be run by tiktoken)")


def _check_bpe_model(model, file):
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
    missing = {b for b in range(256) if bytes([b]) not in ranks}  # HF drops these bytes: see _drop_missing
    if missing and model.get("unk_token") is not None:
        raise ValueError(f"{file}: model.unk_token is {model['unk_token']!r} and model.vocab lacks {len(missing)} of "
                         "the 256 single-byte tokens; HF emits the unknown token for those bytes, which this "
                         "tokenizer does not reproduce (it reproduces dropping them, with unk_token null)")
    for token, i in ranks.items():
        if len(token) > 1 and missing & set(token):  # HF could still emit it whole, from the vocab (ignore_merges)
            raise ValueError(f"{file}: model.vocab has {bytes_to_token(token)!r} (id {i}) but no single-byte token "
                             f"for its byte 0x{min(missing & set(token)):02x}; HF drops that byte before merging "
                             "yet may emit this token whole, which tiktoken cannot reproduce")
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


# ---- bytes the vocabulary has no token for
#
# Some byte-level vocabularies lack a few single bytes (SmolLM2's lacks 21: rare ASCII controls such as 0x04, lead bytes
# of unassigned planes, bytes UTF-8 never uses). HF's BPE, with no unk_token, drops such a byte after the regex split
# and before merging: "hello\x04world" -> [hello, world] ("\x04" was a piece of its own), "!\x04!" -> ["!!"] (one
# piece, merged as if the byte were not there). tiktoken would panic on it, so its Encoding gets each missing byte as
# a placeholder token that merges with nothing. The split is then the real one and every piece without a missing
# byte is right; a piece with one is re-encoded without it (_bpe). tiktoken exposes no split, so that piece's extent
# is found with tiktoken's own regex engine, by two probe encodings (_pieces_holding). Text with no such byte (a
# cheap check) takes tiktoken's path unchanged.


def _bpe(ranks, piece):
    """tiktoken's (and HF's) byte-pair merge of one piece: merge the adjacent pair whose concatenation has the lowest
    rank, leftmost first, until none is in the vocab. No whole-piece lookup first: HF's lookup is of the piece with
    its missing bytes, which is never a token."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:])]
        i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[i] == math.inf:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def _probe(pattern, texts, strings):
    """Token boundaries (byte offsets, 0 .. len) of each text under the same split regex, with the 256 bytes and
    these strings as the only tokens."""
    ranks = {bytes([b]): b for b in range(256)}
    for s in strings:
        ranks.setdefault(s, len(ranks))
    lengths = np.array([len(s) for s in ranks])  # in rank order (dict order)
    enc = tiktoken.Encoding("probe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return [np.concatenate([[0], np.cumsum(lengths[enc.encode_ordinary(t)])]) for t in texts]


def _pieces_holding(pattern, texts, datas, positions):
    """For each text, the (start, end) byte ranges of the regex pieces that hold these byte positions.

    The left probe's tokens are the bytes and data[p-i:p+1] (i = 1..k) for every position p: BPE grows the token
    holding p leftwards, a byte or a merged neighbour at a time, and never across the start of its piece. A token
    [a, b) ends at a position (every probe string does), so a neighbour [c, a) in the same piece, with c >= b-1-k,
    would have merged with it: when the neighbour is that short, a is the piece's start; otherwise k grows. The
    right probe, data[p:p+1+i], is the mirror image and gives the end."""
    pieces, todo, k = [None] * len(texts), list(range(len(texts))), 8
    while todo:
        grow_left = {datas[t][max(p - i, 0):p + 1] for t in todo for p in positions[t] for i in range(1, k + 1)}
        grow_right = {datas[t][p:p + 1 + i] for t in todo for p in positions[t] for i in range(1, k + 1)}
        lefts = _probe(pattern, [texts[t] for t in todo], grow_left)
        rights = _probe(pattern, [texts[t] for t in todo], grow_right)
        unsure = []
        for t, left, right in zip(todo, lefts, rights):
            ps = positions[t]
            j = np.searchsorted(left, ps, "right") - 1  # left[j] <= p < left[j + 1]
            sure = np.all((j == 0) | (left[np.maximum(j - 1, 0)] >= left[j + 1] - 1 - k))
            starts = left[j]
            j = np.searchsorted(right, ps, "right") - 1
            last = len(right) - 1
            sure &= np.all((j + 1 == last) | (right[np.minimum(j + 2, last)] <= right[j] + 1 + k))
            pieces[t] = sorted(set(zip(starts.tolist(), right[j + 1].tolist())))
            if not sure:
                unsure.append(t)
        todo, k = unsure, 4 * k  # a long piece: its edges are further than k bytes from a missing byte
    return pieces


class Tokenizer:
    """BPE on tiktoken (byte-level here, SentencePiece-style through sp): encode(text) -> ids, adding no BOS/EOS and
    reading special-token strings in the text as plain text (so data can't inject control tokens); decode(ids) ->
    text."""

    def __init__(self, mergeable_ranks, special_tokens, pattern, *, nfc=False, eos_id=None, bos_id=None,
                 chat_template=None, special_tokens_map=None, stripped_tokens=frozenset(), merges=None, source=None,
                 name="bpe", sp=None):
        self._n_vocab = max([*mergeable_ranks.values(), *special_tokens.values()], default=-1) + 1
        # A SentencePiece-style file: sp encodes and decodes (sentencepiece_bpe.py); mergeable_ranks is then its
        # vocabulary (UTF-8 of each token -> id), to compare tokenizers by.
        self.sp = sp
        self.missing = b"" if sp else bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)  # HF drops
        placeholders = {bytes([b]): self._n_vocab + k for k, b in enumerate(self.missing)}  # never emitted
        self.enc = sp.enc if sp else tiktoken.Encoding(name, pat_str=pattern, special_tokens=special_tokens,
                                                       mergeable_ranks={**mergeable_ranks, **placeholders})
        self._lengths = None  # bytes per id, for _drop_missing
        self.mergeable_ranks = mergeable_ranks  # bytes -> id
        self.special_tokens = special_tokens  # str -> id: every added token, e.g. {"<|im_start|>": 151644}
        self.pattern, self.nfc = pattern, nfc
        self.eos_id, self.bos_id = eos_id, bos_id
        self.chat_template = chat_template  # the checkpoint's Jinja chat template, or None
        self.special_tokens_map = special_tokens_map or {}  # {"eos_token": "<|im_end|>", ...}: the template's variables
        self.stripped_tokens = stripped_tokens  # added tokens HF matches with lstrip / rstrip / single_word
        self.merges = merges  # [(id_a, id_b), ...] in merge order, for a trained tokenizer
        self.source = source  # the HF directory it was loaded from
        self.files = {}  # from_pretrained: its files' bytes as loaded, which save_pretrained writes back

    @property
    def n_vocab(self):
        return self._n_vocab

    def encode(self, text, at_start=True):
        """HF's ids for text (no BOS/EOS; special-token strings are text). at_start=False: the text follows a
        control token inside a longer input, where a Metaspace "first" tokenizer (Mistral v0.3) puts no "▁" before
        it (chat.render_chat encodes the text between control tokens piece by piece); byte-level BPE ignores it."""
        if self.sp:
            return self.sp.encode(text, at_start)
        text = self.normalize(text)
        ids = self.enc.encode_ordinary(text)
        return self._drop_missing([text], [ids])[0] if self.missing and self._has_missing(text) else ids

    def encode_batch(self, texts):
        if self.sp:
            return self.sp.encode_batch(texts)
        texts = [self.normalize(t) for t in texts]
        ids = self.enc.encode_ordinary_batch(texts)  # on tiktoken's thread pool
        redo = [i for i, t in enumerate(texts) if self._has_missing(t)] if self.missing else []
        for i, fixed in zip(redo, self._drop_missing([texts[i] for i in redo], [ids[i] for i in redo])):
            ids[i] = fixed
        return ids

    def _has_missing(self, text):
        """Whether the text holds a byte the vocab lacks. Scans at C speed; ASCII text can hold only ASCII bytes."""
        if text.isascii():
            return any(chr(b) in text for b in self.missing if b < 128)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which tiktoken replaces: let _drop_missing see to it
            return True
        return len(data.translate(None, self.missing)) < len(data)

    def _drop_missing(self, texts, ids):
        """HF's ids for texts holding bytes the vocab lacks, from tiktoken's ids with placeholders for those bytes:
        each regex piece holding one is re-encoded without it (see "bytes the vocabulary has no token for")."""
        texts = [t.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for t in texts]  # as tiktoken
        datas = [t.encode("utf-8") for t in texts]
        lacking = np.zeros(256, dtype=bool)
        lacking[list(self.missing)] = True
        positions = [np.flatnonzero(lacking[np.frombuffer(d, dtype=np.uint8)]) for d in datas]
        if self._lengths is None:  # bytes per id, placeholders (one byte) included
            self._lengths = np.ones(self._n_vocab + len(self.missing), dtype=np.int64)
            self._lengths[:self._n_vocab] = self.token_byte_lengths()
        out = []
        for data, tokens, pieces in zip(datas, ids, _pieces_holding(self.pattern, texts, datas, positions)):
            bounds = np.concatenate([[0], np.cumsum(self._lengths[tokens])])
            fixed, done = [], 0
            for start, end in pieces:  # a piece's edges are token edges: the placeholders' split is the real one
                first, stop = np.searchsorted(bounds, [start, end])
                assert bounds[first] == start and bounds[stop] == end, "probe and tiktoken split the text apart"
                fixed += tokens[done:first] + _bpe(self.mergeable_ranks, data[start:end].translate(None, self.missing))
                done = stop
            out.append(fixed + tokens[done:])
        return out

    def normalize(self, text):
        """NFC, where the tokenizer.json asks for it. ASCII text is already NFC, and str.isascii() is O(1).
        SentencePiece-style: spaces as "▁", with the dummy prefix where the file puts one."""
        if self.sp:
            return self.sp.normalize(text)
        return unicodedata.normalize("NFC", text) if self.nfc and not text.isascii() else text

    @property
    def fingerprint(self):
        """A hash of everything that decides the ids: token shards cached under one tokenizer are not reused by
        another."""
        h = hashlib.sha256(f"{self.pattern}\0{self.nfc}\0{self.eos_id}\0{self.bos_id}\0".encode())
        if self.sp:  # its tokenizer.json decides the rest (normaliser, vocabulary, merges, added tokens)
            h.update(self.files.get("tokenizer.json", b""))
        else:
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(rank.to_bytes(4, "little") + token)
        h.update(json.dumps(sorted(self.special_tokens.items())).encode())
        return h.hexdigest()

    def document_ids(self):
        """(bos, eos) that frame each corpus document for pretraining: the checkpoint's end-of-text token
        (<|endoftext|> for Qwen and SmolLM2, <|end_of_text|> for Llama-3, <eos> for Gemma, </s> for Mistral and
        Llama-2), preceded by its begin-of-text token where the base model was trained with one (Llama-3's
        <|begin_of_text|>, Gemma's <bos>, Mistral's and Llama-2's <s>). Not an Instruct checkpoint's eos, which
        ends a chat turn (<|im_end|>, <|eot_id|>): DACP text is not a conversation. A tokenizer with none of these
        (our own) uses its eos and bos."""
        for end, begin in END_OF_TEXT:
            if end in self.special_tokens:
                return self.special_tokens.get(begin), self.special_tokens[end]
        return self.bos_id, self.eos_id

    def token_byte_lengths(self):
        """UTF-8 bytes each id stands for, as an int array [n_vocab] (special tokens: 0), for bits per byte.
        SentencePiece-style: the bytes it decodes to ("▁" one space, <0xXX> one byte, a plain added token such as
        Gemma's newline its text); so the dummy-prefix "▁" counts one byte per document that the text lacks."""
        if self.sp:
            return self.sp.token_byte_lengths(self.n_vocab)
        lengths = np.zeros(self.n_vocab, dtype=np.int64)
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    def decode(self, ids):
        if self.sp:
            return self.sp.decode(ids)  # as HF's decoder chain (Replace "▁", ByteFallback, Fuse, Strip)
        return self.enc.decode(ids)  # a cut multi-byte char becomes U+FFFD, as in HF's ByteLevel decoder

    def token_bytes(self, ids):
        """The bytes of each id (a special token: its text)."""
        if self.sp:
            return self.sp.token_bytes(ids)
        return self.enc.decode_tokens_bytes(ids)

    @classmethod
    def from_pretrained(cls, path):
        """An HF tokenizer directory: tokenizer.json, and optionally tokenizer_config.json and generation_config.json
        (eos / bos, chat template)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: not found; Tokenizer.from_pretrained needs an HF tokenizer directory "
                                    "with a tokenizer.json holding a BPE model")
        spec = read_json(file, {})
        model = spec.get("model")
        if not isinstance(model, dict):
            raise ValueError(f"{file}: no 'model' object")
        _check_model_type(model, file)
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        stripped = frozenset(t["content"] for t in spec.get("added_tokens") or []
                             if t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
        sp = None
        if is_sentencepiece_style(spec):  # no ByteLevel step: "▁" for spaces, merges of characters
            sp = SentencePieceBPE(spec, file)
            nfc, pattern = False, sp.pattern
            ranks = {s.encode("utf-8"): i for s, i in model["vocab"].items() if s not in added}
        else:
            _check_bpe_model(model, file)
            nfc = _uses_nfc(spec.get("normalizer"), file)
            pattern = _split_pattern(spec.get("pre_tokenizer"), file)
            ranks = _mergeable_ranks(model, added, file)
            _check_merges(model, ranks, file)

        config_file, gen_file = path / "tokenizer_config.json", path / "generation_config.json"
        config, gen = read_json(config_file, {}), read_json(gen_file, {})

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
        if (path / "chat_template.jinja").is_file():  # where newer transformers save it; it wins, as there
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template is a {type(template).__name__}, not "
                             "a Jinja template string")
        # The template's variables, as transformers reads them: a special_tokens_map.json overrides the config's
        # tokens when the config has no added_tokens_decoder (its legacy path).
        legacy = read_json(path / "special_tokens_map.json", {}) if "added_tokens_decoder" not in config else {}
        named = {**config, **legacy}
        named = {k: v.get("content") if isinstance(v, dict) else v for k, v in named.items() if k in NAMED_TOKENS}
        eos_id, bos_id = token_id("eos"), token_id("bos")
        try:
            tok = cls(ranks, added, pattern, nfc=nfc, eos_id=eos_id, bos_id=bos_id, chat_template=template,
                      special_tokens_map={k: v for k, v in named.items() if isinstance(v, str)},
                      stripped_tokens=stripped, source=path, name=path.name or "bpe", sp=sp)
        except ValueError as e:  # e.g. a Split regex that tiktoken's engine (fancy-regex) cannot compile
            raise ValueError(f"{file}: pre_tokenizer regex {pattern!r}: tiktoken refused it: {e}") from None
        # The files as they were when loaded: an export writes the tokenizer the run used, even if the folder it
        # came from has changed or gone since.
        tok.files = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}
        return tok

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

        vocab, merges = train_bpe(texts, n_merges)
        specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
        chatml = "<|im_start|>" in specials and "<|im_end|>" in specials
        eos = special_tokens[0] if specials else None
        return cls({b: i for i, b in enumerate(vocab)}, specials, LLAMA3_PATTERN, nfc=True,
                   eos_id=specials.get(eos), chat_template=CHATML_TEMPLATE if chatml else None,
                   special_tokens_map={"eos_token": eos, "pad_token": eos} if eos else {},  # as save_pretrained writes
                   merges=merges)

    def save_pretrained(self, path, model_max_length=2048):
        """Write tokenizer.json and tokenizer_config.json that transformers.AutoTokenizer and tokenizers load with
        the same ids. A tokenizer loaded from an HF directory copies that directory's tokenizer files: exact."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.files:
            for name, data in self.files.items():
                write_atomic(path / name, data)
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
            write_atomic(path / name, json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8"))
