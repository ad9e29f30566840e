"""SentencePiece-style BPE on tiktoken, with the same ids as HF tokenizers.

The tokenizer.json files of Llama-2, TinyLlama, Mistral v0.1 / v0.3 and Gemma(-3) (converted by transformers from
SentencePiece models) spell a space as the metaspace "▁" (a normalizer Replace(" ", "▁") with Prepend("▁"), or a
Metaspace pre-tokenizer), merge characters (not bytes) with a BPE pair list, and write a character the vocabulary
lacks as its UTF-8 bytes, one <0xXX> token each (byte fallback). tokenizer.Tokenizer.from_pretrained hands such a
file to SentencePieceBPE, which encodes with a tiktoken Encoding and maps its output to HF's ids. Anything that
cannot be reproduced exactly is refused with a one-line error naming the file and the field.

How tiktoken runs a character-level BPE. tiktoken merges bytes: it repeatedly joins the adjacent pair whose
concatenation has the lowest rank, and its ranks are its output ids. So its ranks here are a priority order, mapped
to HF's ids afterwards (a lookup table):
  0-255                the single bytes;
  then                 each multi-byte character of the vocabulary, assembled from its bytes prefix by prefix (the
                       prefixes are ranks of their own); below every merge, so characters are whole before any merge;
  then                 the merged tokens, in the order of their first merge in model.merges.
A byte or a partial character left over belongs to a character the vocabulary lacks: it becomes its <0xXX> ids
(or the unknown token). Why this equals HF's pair list is _complete's docstring.
"""
import json
import operator
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tiktoken

SPACE = "\u2581"  # "▁", SentencePiece's metaspace: a space, and the dummy prefix put before a text
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token
MARK = -2  # _to_ids: an id to put in
_BYTE_DECODED = re.compile(r"<0x(\+[0-9A-Fa-f]|[0-9A-Fa-f]{2})>")  # what HF's ByteFallback decoder reads as one


def is_sentencepiece_style(spec):
    """Whether a tokenizer.json is for this module: no ByteLevel step (those are tokenizer.py's byte-level BPE)."""
    steps = []
    for part in (spec.get("pre_tokenizer"), spec.get("decoder")):
        steps += _steps(part, "pretokenizers") + _steps(part, "decoders")
    return not any(s.get("type") == "ByteLevel" for s in steps)


def _steps(part, key):
    """The steps of a normalizer / pre_tokenizer / decoder: a Sequence's list, one step, or none."""
    if not part:
        return []
    return list(part.get(key) or []) if part.get("type") == "Sequence" else [part]


def _refuse(file, field, value, supported):
    return ValueError(f"{file}: {field} {json.dumps(value, ensure_ascii=False)[:200]} is not supported for "
                      f"SentencePiece-style BPE; supported: {supported}")


# ---- reading tokenizer.json


def _text_steps(spec, file):
    """What the normalizer and pre_tokenizer do to each stretch of text, as (prepend, scheme, split): Prepend("▁")
    in the normalizer (the legacy Llama-2 / Mistral form; before every stretch, even one starting with "▁"); the
    Metaspace prepend_scheme ("always": before a stretch not starting with "▁"; "first": only the stretch at the
    start of the text; "never"); and Metaspace's split (a word starts at each "▁"). Spaces become "▁" either way."""
    prepend, replaced = 0, False
    for step in _steps(spec.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == SPACE:
            prepend += 1
        elif (step.get("type") == "Replace" and step.get("pattern") == {"String": " "}
              and step.get("content") == SPACE):
            replaced = True
        else:
            raise _refuse(file, "normalizer", step, 'Prepend("▁") and Replace(" ", "▁"), alone or in a Sequence')
    scheme, split, metaspace = "never", False, False
    for step in _steps(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement") == SPACE and not metaspace:
            metaspace = replaced = True
            # files from before prepend_scheme existed say add_prefix_space (true: "always"); split defaults to true
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            split = step.get("split", True)
            if scheme not in ("always", "first", "never"):
                raise _refuse(file, "pre_tokenizer Metaspace.prepend_scheme", scheme, "always, first, never")
        elif kind == "Split" and step.get("pattern") == {"String": " "} and replaced and not step.get("invert"):
            pass  # Gemma: every space is "▁" already, so splitting on " " does nothing
        else:
            raise _refuse(file, "pre_tokenizer", step,
                          'null, Metaspace("▁"), or Split(" ") after spaces became "▁"')
    if not replaced:
        raise ValueError(f'{file}: neither the normalizer nor the pre_tokenizer turns spaces into "▁"; this is not '
                         "a SentencePiece-style tokenizer (and no ByteLevel step makes it a byte-level one)")
    return prepend, scheme, split


DECODE_STEPS = ('Replace("▁", " "), ByteFallback, Fuse, Strip(content, start, stop=0), Metaspace("▁"), alone or in '
                'a Sequence')


def _decoder_steps(decoder, file):
    steps = []
    for step in _steps(decoder, "decoders"):
        kind = step.get("type")
        if kind == "Replace" and step.get("pattern") == {"String": SPACE} and step.get("content") == " ":
            steps.append(("replace",))
        elif kind in ("ByteFallback", "Fuse"):
            steps.append((kind,))
        elif kind == "Strip" and len(step.get("content", "")) == 1 and not step.get("stop"):  # (HF's stop panics)
            steps.append(("strip", step["content"], step.get("start", 0)))
        elif kind == "Metaspace" and step.get("replacement") == SPACE:
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            steps.append(("metaspace", scheme != "never"))
        else:
            raise _refuse(file, "decoder", step, DECODE_STEPS)
    return steps


def _check_model(model, file):
    for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(field):  # random merge dropout; word-piece affixes
            raise ValueError(f"{file}: model.{field} is {model[field]!r}; SentencePiece-style BPE through tiktoken "
                             "has no such thing, so ids would differ from HF")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ValueError(f"{file}: model.vocab (a dict) and model.merges (a list) are required for BPE")
    vocab, unk = model["vocab"], model.get("unk_token")
    if unk is not None and unk not in vocab:
        raise ValueError(f"{file}: model.unk_token {unk!r} is not in model.vocab")
    if not model.get("byte_fallback") and unk is None:  # HF drops the character, and merges across the gap
        raise ValueError(f"{file}: model.byte_fallback is false and model.unk_token is null, so HF drops a character "
                         "outside the vocabulary before merging; tiktoken cannot reproduce that")
    if model.get("byte_fallback"):
        lacking = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
        if lacking:  # HF then falls back to the unknown token per character, which is not reproduced
            raise ValueError(f"{file}: model.byte_fallback is true but model.vocab lacks {len(lacking)} of the 256 "
                             f"byte tokens (<0x{lacking[0]:02X}> ...); only a complete set is supported")
    if SPACE not in vocab:
        raise ValueError(f'{file}: model.vocab has no "▁" token; not a SentencePiece-style vocabulary')


def _merge_pairs(model, file):
    """model.merges as (lefts, rights, merged) (["a", "b"], or "a b" in older files; a pair listed twice keeps its
    last rank, as in HF), checked: both parts and their concatenation are vocabulary tokens, and no part is a
    byte-fallback or unknown token (HF's BPE could then join symbols that tiktoken keeps as raw bytes). Set
    operations first; the slow loop only names the first bad merge."""
    vocab, merges = model["vocab"], model["merges"]
    pairs = merges if all(map(list.__instancecheck__, merges)) else [
        m.split(" ") if isinstance(m, str) else m for m in merges]
    forbidden = {model.get("unk_token")} | {s for s in vocab if len(s) == 6 and _BYTE_TOKEN.fullmatch(s)}
    if set(map(len, pairs)) <= {2}:
        lefts, rights = list(map(operator.itemgetter(0), pairs)), list(map(operator.itemgetter(1), pairs))
        merged = list(map(operator.add, lefts, rights))
        parts = set(lefts) | set(rights)
        if vocab.keys() >= parts and vocab.keys() >= set(merged) and not parts & forbidden:
            if len(set(zip(lefts, rights))) < len(lefts):
                kept = sorted(dict(zip(zip(lefts, rights), range(len(lefts)))).items(), key=lambda kv: kv[1])
                lefts, rights = [p[0] for p, _ in kept], [p[1] for p, _ in kept]
                merged = list(map(operator.add, lefts, rights))
            return lefts, rights, merged
    for n, pair in enumerate(pairs):
        problem = "not two tokens" if len(pair) != 2 else next(
            (f"{p!r} is not in model.vocab" for p in pair if p not in vocab), None)
        if problem is None and "".join(pair) not in vocab:
            problem = f"the merged token {''.join(pair)!r} is not in model.vocab"
        if problem is None and set(pair) & forbidden:
            problem = "a byte-fallback or unknown token is merged"
        if problem:
            raise ValueError(f"{file}: model.merges[{n}] {merges[n]!r}: {problem}")
    raise AssertionError("no bad merge found")


def _candidates(merged, chars):
    """The merged tokens in the order of their first merge (tiktoken's priority order; see _complete), and whether
    the merges making each one are contiguous in the list. A token holding a character outside the vocabulary is
    never made (that character becomes byte or unknown tokens, which no merge joins), so it is left out."""
    index = range(len(merged))
    first = dict(zip(reversed(merged), reversed(index)))  # the smallest index wins
    last, count = dict(zip(merged, index)), Counter(merged)
    tokens = sorted((t for t in first if len(t) > 1 and set(t) <= chars), key=first.__getitem__)
    return tokens, all(last[t] - first[t] + 1 == count[t] for t in tokens)


def _complete(kept, chars, lefts, rights, merged):
    """Whether tiktoken's BPE, with the kept tokens ranked by their first merge, makes HF's choices exactly.

    HF's BPE joins the adjacent pair listed first in model.merges (leftmost on a tie); tiktoken joins the adjacent
    pair whose concatenation ranks lowest, listed or not. They agree at every step when
      (i)  the merges making one token are contiguous in the list (_candidates), so comparing first merges orders
           pairs as HF's ranks do;
      (ii) the ranks hold only tokens tiktoken makes whole from their own text (_made_whole), and every split of a
           kept token into two kept tokens or characters is listed, so a pair tiktoken can join HF can join.
    By induction over the steps on any text: a listed pair making a token that is not kept is never joined by HF
    either (a token made in context is made alone: the joins inside it happen in the same order), and two pairs
    making the same token t can only be t's one split that HF's run on t alone passes through, so both pick the
    leftmost. Files converted from SentencePiece list every split of every token (transformers generates them so),
    so they pass; merges learned by a BPE trainer list one split per token and are checked token by token with
    HF's own algorithm instead (_hf_bpe)."""
    members = set(kept) | chars
    if (set(lefts) | set(rights)) <= members:
        listed = Counter(merged)
    else:
        listed = Counter(t for a, b, t in zip(lefts, rights, merged) if a in members and b in members)
    need = [t for t in kept if listed[t] != len(t) - 1]  # (a token with every split listed is fine)
    if not need:
        return True
    prefixes = [t[:k] for t in need for k in range(1, len(t))]
    suffixes = [t[k:] for t in need for k in range(1, len(t))]
    inside = map(members.__contains__, prefixes), map(members.__contains__, suffixes)
    found = np.fromiter(map(operator.and_, *inside), dtype=np.int64, count=len(prefixes))
    starts = np.cumsum([0] + [len(t) - 1 for t in need[:-1]])
    return bool((np.add.reduceat(found, starts) == [listed[t] for t in need]).all())


def _hf_bpe(word, ranks):
    """HF's BPE on one word of vocabulary characters (tokenizers' Word::merge_all): join the listed adjacent pair
    with the lowest merge rank, leftmost first, until none is listed. Returns the symbols and the rank of the last
    join (None if none)."""
    parts, rank = list(word), None
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: (ranks.get((parts[i], parts[i + 1]), 1 << 60), i))
        r = ranks.get((parts[best], parts[best + 1]))
        if r is None:
            break
        parts[best:best + 2], rank = [parts[best] + parts[best + 1]], r
    return parts, rank


def _unused_ascii(tokens, what):
    """An ASCII character (a control character, if one will do) that no token holds: it joins nothing."""
    joined = "".join(tokens)
    found = next((c for c in map(chr, [*range(1, 32), *range(127, 31, -1)]) if c not in joined), None)
    if found is None:
        raise ValueError(f"{what}: every ASCII character occurs inside some token; not supported")
    return found


# ---- added tokens HF cuts out of the text before normalising it


def _trie_regex(strings):
    """A regex matching the longest of these strings at the leftmost place (HF's added-token matcher is
    leftmost-longest): a trie, so each position tries a few characters, not every string."""
    trie = {}
    for s in strings:
        node = trie
        for c in s:
            node = node.setdefault(c, {})
        node[""] = True

    def walk(node):
        branches = [re.escape(c) + walk(sub) for c, sub in sorted(node.items()) if c]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer string first, the shorter if it fails

    return re.compile(walk(trie))


class SentencePieceBPE:
    """Encoder and decoder for one SentencePiece-style tokenizer.json (spec: its parsed JSON, file: its path)."""

    def __init__(self, spec, file):
        model = spec["model"]
        _check_model(model, file)
        vocab = model["vocab"]
        self.prepend, self.scheme, self.split = _text_steps(spec, file)
        self.decode_steps = _decoder_steps(spec.get("decoder"), file)
        self.ignore_merges = bool(model.get("ignore_merges"))
        if self.ignore_merges and self.split:  # HF looks every word up whole, tiktoken only its kept tokens
            raise ValueError(f"{file}: model.ignore_merges is true with a splitting pre_tokenizer; not supported")
        self.vocab = vocab
        self.byte_fallback, self.fuse_unk = bool(model.get("byte_fallback")), bool(model.get("fuse_unk"))
        self.unk_id = vocab.get(model.get("unk_token")) if model.get("unk_token") is not None else None

        added = spec.get("added_tokens") or []
        self.id_to_token = {i: s for s, i in vocab.items()}
        self.id_to_token.update({t["id"]: t["content"] for t in added})
        self.added_ids = {t["content"]: t["id"] for t in added}
        self.byte_ids = {i for s, i in vocab.items() if len(s) == 6 and _BYTE_TOKEN.fullmatch(s)}
        self.control_ids = {t["id"] for t in added if t.get("special")}
        # HF cuts every added token out of the text, except (as our encode asks: encode_special_tokens) special
        # ones, which stay text; a special one still hides the plain ones it overlaps, so those are matched too.
        plain = [t for t in added if not t.get("special")]
        for t in plain:
            for flag in ("normalized", "lstrip", "rstrip", "single_word"):
                if t.get(flag):
                    raise ValueError(f"{file}: added_tokens {t['content']!r} (not special) has {flag} true; only "
                                     "plain matching of the raw text is supported")
        names = {t["content"] for t in plain}
        self.cut = {s: self.added_ids[s] for s in names}  # the cut-out ones, content -> id
        self.matcher = None
        if names:  # a special token overlaps a plain one when it holds one, or ends with the start of one
            inside, starts = _trie_regex(names), {n[:k] for n in names for k in range(1, len(n))}
            overlapping = {s for t in added if t.get("special") for s in [t["content"]]
                           if inside.search(s) or any(s[k:] in starts for k in range(1, len(s)))}
            self.matcher = _trie_regex(names | overlapping)

        lefts, rights, merged = _merge_pairs(model, file)
        chars = {s for s in vocab if len(s) == 1}
        tokens, contiguous = _candidates(merged, chars)
        self._build(vocab, tokens)
        made = self._made_whole(tokens)
        kept = [t for t, m in zip(tokens, made) if m]
        if not (contiguous and _complete(kept, chars, lefts, rights, merged)):
            # learned merges: HF's own run on each token decides which are made, and ranks them by its last join
            ranks = dict(zip(zip(lefts, rights), range(len(lefts))))
            runs = {t: _hf_bpe(t, ranks) for t in tokens}
            kept = sorted((t for t, (parts, _) in runs.items() if len(parts) == 1), key=lambda t: runs[t][1])
            self._build(vocab, kept)
        self.kept = kept
        # self.sep marks an id in the text tiktoken encodes (_encode_one); the lookup (a list: mapping a list of
        # ranks is fastest in Python) gives MARK there, and the character's own ids are its expansion
        self.sep = _unused_ascii(tokens, file)
        s = ord(self.sep)
        self.expansion[s] = [int(self.table[s])] if self.table[s] >= 0 else self.expansion[s]
        self.lookup = self.table.tolist()
        self.lookup[s] = MARK

    # ---- construction

    def _build(self, vocab, tokens):
        """tiktoken's ranks (see the module docstring), self.table (per rank, the HF id it stands for, or -1: a
        leftover byte or partial character, whose ids are self.expansion[rank]) and the Encoding."""
        ranks = {bytes([b]): b for b in range(256)}
        for c in sorted(s for s in vocab if len(s) == 1):
            data = c.encode("utf-8")
            for k in range(2, len(data) + 1):  # the prefixes, then the whole character
                ranks.setdefault(data[:k], len(ranks))
        table = np.full(len(ranks) + len(tokens), -1, dtype=np.int64)
        expansion = {}
        for data, r in ranks.items():
            if r < 128 and chr(r) in vocab or r >= 256 and len(data.decode("utf-8", "ignore").encode()) == len(data):
                table[r] = vocab[data.decode("utf-8")]
            elif self.byte_fallback:
                expansion[r] = [vocab[f"<0x{b:02X}>"] for b in data]
            else:  # one unknown token per character, at its first byte
                expansion[r] = [] if 0x80 <= data[0] < 0xC0 else [self.unk_id]
        self.first_token_rank = len(ranks)
        table[len(ranks):] = [vocab[t] for t in tokens]
        ranks.update(zip((t.encode("utf-8") for t in tokens), range(len(ranks), len(ranks) + len(tokens))))
        self.ranks, self.table, self.expansion = ranks, table, expansion
        self.pattern = self._split_pattern(tokens)
        self.enc = tiktoken.Encoding("sentencepiece-bpe", pat_str=self.pattern, mergeable_ranks=ranks,
                                     special_tokens={})

    def _made_whole(self, tokens):
        """Whether tiktoken's BPE makes each token whole from its own text. The tokens are encoded joined by a
        character no token holds, which joins nothing (so each token's run is its own) and ends every piece (so
        no piece is looked up whole). A token not made is made nowhere (a token made in context is made alone),
        so it never changes a run; but tiktoken looks a piece up whole before merging, so such a token, met as a
        whole piece, gets the ids of its own run (self.expansion)."""
        stop = _unused_ascii(tokens, "the merges")
        check = tiktoken.Encoding("check", pat_str=f"[^{re.escape(stop)}]*{re.escape(stop)}",
                                  mergeable_ranks=self.ranks, special_tokens={})
        chunks = [stop.join(tokens[k:k + 4096]) + stop for k in range(0, len(tokens), 4096)]
        out = np.concatenate([np.zeros(0, dtype=np.uint32)] + [check.encode_to_numpy(c) for c in chunks])
        out = out.astype(np.int64)
        ends = np.flatnonzero(out == ord(stop))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        whole = self.first_token_rank + np.arange(len(tokens))
        made = (ends - starts == 1) & (out[np.maximum(ends - 1, 0)] == whole)
        for k in np.flatnonzero(~made).tolist():
            self.expansion[int(whole[k])] = self.table[out[starts[k]:ends[k]]].tolist()
            self.table[whole[k]] = -1
        return made.tolist()

    def _split_pattern(self, kept):
        """tiktoken's split regex. With Metaspace(split=true), HF's own words: a "▁" starts one. Otherwise HF runs
        BPE on a whole stretch of text, and tiktoken gets pieces cut where no kept token can cross: before a "▁"
        (or a run of them) that follows a character c such that no kept token holds c"▁". A merge across such a
        cut would make a token holding c"▁"; there is none, so BPE on the pieces joins exactly what it joins on
        the whole, and an unknown character never sits on either side of the cut ("▁" is in the vocabulary), so
        fuse_unk fuses the same runs."""
        if self.split:
            return f"[^{SPACE}]+|{SPACE}[^{SPACE}]*"
        before = sorted({t[i - 1] for t in kept for i in range(1, len(t)) if t[i] == SPACE and t[i - 1] != SPACE})
        glue = "".join(map(re.escape, before))
        if not glue:
            return f"{SPACE}*[^{SPACE}]+|{SPACE}+"
        return f"{SPACE}*(?:[^{SPACE}{glue}]|[{glue}]{SPACE}*)+|{SPACE}+"

    # ---- encoding

    def _stretches(self, text, at_start=True):
        """The text as HF's added-token matcher cuts it: [(stretch of text, starts the input), or an added id].
        at_start=False: the text itself follows a control token in a longer input (chat.render_chat's pieces)."""
        if self.matcher is None:
            return [(text, at_start)]
        out, pos = [], 0
        for m in self.matcher.finditer(text):
            if m.group() not in self.cut:
                continue  # a special token: text
            out.append((text[pos:m.start()], at_start and pos == 0))
            out.append(self.cut[m.group()])
            pos = m.end()
        out.append((text[pos:], at_start and pos == 0))
        return out

    def normalize(self, text, at_start=True):
        """One stretch of text as HF's normalizer and pre-tokenizer leave it (empty stays empty)."""
        if not text:
            return text
        text = SPACE * self.prepend + text.replace(" ", SPACE)
        if (self.scheme == "always" or self.scheme == "first" and at_start) and not text.startswith(SPACE):
            text = SPACE + text
        return text

    def _parts(self, text, at_start=True):
        """The text as HF encodes it: normalised stretches of text, and the ids HF gives without BPE (an added
        token it cuts out, or with ignore_merges a stretch that is a vocabulary token whole)."""
        parts = []
        for part in self._stretches(text, at_start):
            if isinstance(part, int):
                parts.append(part)
                continue
            norm = self.normalize(*part)
            if norm and self.ignore_merges and norm in self.vocab:
                parts.append(self.vocab[norm])
            elif norm:
                parts.append(norm)
        return parts

    def _encode_one(self, text, at_start=True):
        """One text's ids. Its parts go to tiktoken as one string, each id that needs no BPE marked by self.sep, a
        character no kept token holds (so it joins nothing and BPE on the string is BPE on each part), which
        _to_ids then replaces by the id. A text holding that character itself is encoded part by part."""
        parts = self._parts(text, at_start)
        encode = self.enc.encode_ordinary  # (a lone surrogate, which HF refuses, becomes U+FFFD, as in tiktoken)
        if all(isinstance(p, str) for p in parts):
            return self._to_ids(encode("".join(parts)), []) if parts else []
        if self.sep not in text:
            joined = "".join(self.sep if isinstance(p, int) else p for p in parts)
            return self._to_ids(encode(joined), [p for p in parts if isinstance(p, int)])
        return [i for p in parts for i in ([p] if isinstance(p, int) else self._to_ids(encode(p), []))]

    def encode(self, text, at_start=True):
        return self._encode_one(text, at_start)

    def encode_batch(self, texts, threads=8):
        """HF's ids (no BOS/EOS; special-token strings are text) for each text, on a thread pool (tiktoken lets go
        of the GIL while it encodes)."""
        if len(texts) <= 1:
            return [self._encode_one(t) for t in texts]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self._encode_one, texts))

    def _to_ids(self, ranks, marked):
        """tiktoken's ranks -> HF ids: the marked ids where self.sep is, leftover bytes and partial characters
        expanded (to <0xXX> ids, or unknown tokens, fused runs of them with fuse_unk)."""
        ids = list(map(self.lookup.__getitem__, ranks))
        at = -1
        for i in marked:  # (list.index scans at C speed)
            at = ids.index(MARK, at + 1)
            ids[at] = i
        if not ids or min(ids) >= 0:
            return ids
        out = []
        for r, i in zip(ranks, ids):
            if i >= 0:
                out.append(i)
            else:
                unk = self.expansion[r]
                if unk and self.fuse_unk and unk[0] == self.unk_id and out and out[-1] == self.unk_id:
                    continue  # fuse_unk: a run of unknown characters is one unknown token
                out += unk
        return out

    # ---- decoding, as HF's decoder chain

    def decode(self, ids):
        tokens = [self.id_to_token[i] for i in ids if i in self.id_to_token]  # HF drops unknown ids
        if not self.decode_steps:
            return " ".join(tokens)  # HF without a decoder
        for step in self.decode_steps:
            kind = step[0]
            if kind == "replace":
                tokens = [t.replace(SPACE, " ") for t in tokens]
            elif kind == "Fuse":
                tokens = ["".join(tokens)]
            elif kind == "strip":
                tokens = [_strip(t, *step[1:]) for t in tokens]
            elif kind == "metaspace":  # the first token loses its "▁" (prepended), the others become spaces
                tokens = [t.replace(SPACE, "" if k == 0 and step[1] else " ") for k, t in enumerate(tokens)]
            else:
                tokens = _byte_fallback(tokens)
        return "".join(tokens)

    def token_bytes(self, ids):
        """The bytes each id stands for in decoded text: "▁" is a space, <0xXX> its byte, an added token its text."""
        out = []
        for i in ids:
            s = self.id_to_token.get(i, "")
            out.append(bytes([int(s[3:5], 16)]) if i in self.byte_ids else s.replace(SPACE, " ").encode("utf-8"))
        return out

    def token_byte_lengths(self, n_vocab):
        """Bytes per id for bits per byte: as token_bytes, and 0 for control (special) tokens."""
        lengths = np.zeros(n_vocab, dtype=np.int64)
        ids = [i for i in self.id_to_token if i not in self.control_ids and i < n_vocab]
        lengths[ids] = [len(b) for b in self.token_bytes(ids)]
        return lengths


def _strip(token, content, start):
    """HF's Strip decoder (stop 0): up to start leading copies of content off each token."""
    n = 0
    while n < start and n < len(token) and token[n] == content:
        n += 1
    return token[n:]


def _byte_fallback(tokens):
    """HF's ByteFallback decoder: a run of byte tokens becomes its bytes as UTF-8, or one U+FFFD per token when they
    are not valid UTF-8. A byte token is HF's test: 6 bytes, "<0x" .. ">", and Rust's u8::from_str_radix (which
    takes a "+") reads the middle."""
    out, run = [], []
    for t in tokens + [None]:
        m = _BYTE_DECODED.fullmatch(t) if t is not None and len(t) == 6 else None
        if m:
            run.append(int(m.group(1), 16))
            continue
        if run:
            try:
                out.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = []
        if t is not None:
            out.append(t)
    return out
