"""Data for DACP, in the order the pipeline uses it: corpus -> token shards, the replay-mixed token stream, and SFT
batches (conversations rendered by chat.py, with its loss mask).
"""
import bz2
import codecs
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import lzma
import math
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chat import check_messages, render_chat
from files import commit, sweep_temporaries, temporary_name
from model import IGNORE

# -----------------------------------------------------------------------------
# Corpora and token shards
#
# A domain is a folder data/<domain>/ with train/ and, optionally, val/ (docs/training.md has the table of layouts and
# formats). A .txt file is one document; a .jsonl file has one document per row, {"text": ...} (--text-key names
# another key); so has a .parquet file (a column), when pyarrow is installed. .txt and .jsonl may be compressed
# (.gz, .bz2, .xz): they are decompressed as they are read. Documents are joined as [bos] doc [eos] (bos only where
# the tokenizer has one), so the model learns where documents end. Tokenised corpora are cached as one flat .bin of
# uint16 (uint32 for vocabularies over 65536) per split, read back through np.memmap: a corpus never has to fit in
# memory, and neither does one file while it is tokenised (a huge .txt is read in pieces: txt_pieces).

TEXT_KEY = "text"  # the key (column) of a .jsonl / .parquet row that holds its document, unless --text-key says
HELD_OUT = 100  # a domain without val/ holds out 1 in HELD_OUT of its train documents as val (held_out_documents)
PIECE_CHARS = 8 << 20  # a .txt longer than this (8 M characters) is read and tokenised in pieces of at most this
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # all in the standard library
SUFFIXES = (".txt", ".jsonl", ".parquet") + tuple(kind + c for kind in (".txt", ".jsonl") for c in COMPRESSED)


def find_domains(data_root):
    if not os.path.isdir(data_root):
        return []
    return sorted(d for d in os.listdir(data_root) if os.path.isdir(os.path.join(data_root, d, "train")))


def holds_out(data_root, domain):
    """Whether the domain's val split is held out of its train files (it has train/ but no val/ folder)."""
    return domain in find_domains(data_root) and not os.path.isdir(os.path.join(data_root, domain, "val"))


def corpus_files(data_root, domain, split):
    """The corpus files (SUFFIXES) of data/<domain>/<split>/, in path order; for the val split of a domain without
    val/, its train files (the held-out documents come from them). A domain needs a train/ folder, except an
    evaluation-only one (data/heldout: val/ and eval/) asked for its val split."""
    if domain not in find_domains(data_root) and not (split == "val" and os.path.isdir(os.path.join(
            data_root, domain, "val"))):
        found = ", ".join(find_domains(data_root)) or "none"
        raise ValueError(f"unknown domain {domain!r}: no {os.path.join(data_root, domain, 'train')}/ "
                         f"(domains found in {data_root}: {found})")
    folder = os.path.join(data_root, domain, "train" if split == "val" and holds_out(data_root, domain) else split)
    files = []
    for parent, subfolders, names in os.walk(folder):  # subfolders too (hidden ones skipped), in path order
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        files += [os.path.join(parent, f) for f in names if f.endswith(SUFFIXES)]
    files.sort()
    if not files:
        raise ValueError(f"{folder}/: no corpus files (" + ", ".join(SUFFIXES) + ")")
    return files


def open_binary(path, raw):
    """A corpus file's bytes, decompressed on the fly when its name says it is compressed (raw: the file itself)."""
    ext = os.path.splitext(path)[1]
    return COMPRESSED[ext](raw) if ext in COMPRESSED else raw


@contextlib.contextmanager
def reading(path):
    """(the file on disk, its text): the position of the first is the progress; a file that is not UTF-8 or a
    damaged compressed file is a one-line error naming it."""
    with open(path, "rb") as raw:
        try:  # universal newlines, as open(path, encoding="utf-8"): a .txt.gz reads as the same .txt
            yield raw, io.TextIOWrapper(open_binary(path, raw), encoding="utf-8")
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        except (EOFError, OSError, lzma.LZMAError) as e:
            if not path.endswith(tuple(COMPRESSED)):
                raise
            raise ValueError(f"{path}: not a readable {os.path.splitext(path)[1]} file ({e})") from None


def not_utf8(path):
    """The error for a file that is not UTF-8 text, naming the file and its first bad byte (of the decompressed
    text), found by decoding it again in 1 MB pieces: this runs only once decoding has failed."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as raw, open_binary(path, raw) as f:
        for chunk in itertools.chain(iter(lambda: f.read(1 << 20), b""), [None]):
            pending = decoder.getstate()[0]  # the bytes of a character cut at the last chunk's end
            try:
                decoder.decode(chunk or b"", final=chunk is None)
            except UnicodeDecodeError as e:
                bad, at = (pending + (chunk or b""))[e.start], offset - len(pending) + e.start
                return ValueError(f"{path}: not UTF-8 text (byte 0x{bad:02x} at offset {at}); convert it to UTF-8, "
                                  "e.g. with iconv -f latin1 -t utf-8")
            offset += len(chunk or b"")
    return ValueError(f"{path}: not UTF-8 text")


def jsonl_rows(f, path):
    """Yield ("file:line", row) for each non-blank line of an open .jsonl file; a line that is not a JSON object is
    an error naming its file and line (callers check the row's keys and name the place the same way)."""
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


def read_jsonl(path):
    """jsonl_rows of a .jsonl file (compressed too)."""
    with reading(path) as (_, f):
        yield from jsonl_rows(f, path)


def txt_pieces(f, piece_chars):
    """A .txt document as (piece, last) pairs, so that memory stays bounded however large the file: while more than
    piece_chars characters are left, a piece is the next piece_chars characters cut just after the last blank line
    ("\\n\\n") in them (or all of them, when they hold none). A file of at most piece_chars characters is one piece.
    BPE never merges across a piece boundary, so the tokens there can differ from encoding the file whole."""
    rest = ""
    while True:
        text = rest + f.read(piece_chars + 1 - len(rest))
        if len(text) <= piece_chars:
            yield text, True
            return
        cut = text.rfind("\n\n", 0, piece_chars)
        cut = cut + 2 if cut >= 0 else piece_chars
        yield text[:cut], False
        rest = text[cut:]


def parquet_rows(path, text_key):
    """Yield (document, bytes read) for the rows of a .parquet file, one row group in memory at a time."""
    try:
        import pyarrow.parquet as pq  # optional: only .parquet corpora need it
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # (pyarrow's own error classes)
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if text_key not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); name the "
                         "text column with --text-key")
    size, groups, row = os.path.getsize(path), pf.num_row_groups, 0
    for g in range(groups):
        for text in pf.read_row_group(g, columns=[text_key]).column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row}: expected a string in column {text_key!r}, got "
                                 f"{type(text).__name__}")
            yield text, size * g // groups


def read_pieces(path, text_key=TEXT_KEY, piece_chars=PIECE_CHARS):
    """Yield (text, ends_document, bytes of the file read so far) for one corpus file: a .jsonl or .parquet row is a
    document, a .txt file is one document in one piece or several (txt_pieces). Blank documents are skipped."""
    if path.endswith(".parquet"):
        for text, done in parquet_rows(path, text_key):
            if text.strip():
                yield text, True, done
        return
    with reading(path) as (raw, f):
        if path.endswith(tuple(".jsonl" + c for c in ("", *COMPRESSED))):  # (notes.jsonl.txt is text)
            for where, row in jsonl_rows(f, path):
                if not isinstance(row.get(text_key), str):
                    raise ValueError(f'{where}: expected a row {{"{text_key}": <string>}} (the key is --text-key)')
                if row[text_key].strip():
                    yield row[text_key], True, raw.tell()
            return
        for i, (text, last) in enumerate(txt_pieces(f, piece_chars)):
            if not (i == 0 and last and not text.strip()):  # (a blank file is no document)
                yield text, last, raw.tell()


def read_documents(files, text_key=TEXT_KEY):
    """Yield the documents of these files one at a time, each whole (never the whole corpus in memory)."""
    for path in files:
        parts = []
        for text, last, _ in read_pieces(path, text_key):
            parts.append(text)
            if last:
                yield "".join(parts)
                parts = []


def held_out_documents(files, text_key, piece_chars, every=HELD_OUT):
    """The val split of a domain without val/: the indices (in corpus order) of its held-out documents, those whose
    content hash (the first 8 bytes of the UTF-8 SHA-256, big-endian) is 0 modulo `every` (1 in 100 by default), or
    when that picks none, those with the smallest hash. A hash of the content, not of names or order: the same
    documents on every run and machine, a duplicate never on both sides; train skips them. One pass over the
    corpus, hashing each document as its pieces stream by."""
    held, smallest, n, h = set(), (None, []), 0, hashlib.sha256()
    for path in files:
        for text, last, _ in read_pieces(path, text_key, piece_chars):
            h.update(text.encode("utf-8", "surrogatepass"))  # (pieces hash as their concatenation)
            if last:
                value = int.from_bytes(h.digest()[:8], "big")
                if value % every == 0:
                    held.add(n)
                if smallest[0] is None or value <= smallest[0]:
                    smallest = (value, smallest[1] + [n] if value == smallest[0] else [n])
                n, h = n + 1, hashlib.sha256()
    held = held or set(smallest[1])
    if len(held) >= n:
        raise ValueError(f"{os.path.dirname(files[0])}/: {n} distinct document(s), too few to hold out a val split "
                         "from; add a val/ folder")
    return held


def tokenize_corpus(tokenizer, data_root, domain, split, text_key=TEXT_KEY, skip_held_out=False,
                    batch_bytes=8 << 20, piece_chars=PIECE_CHARS):
    """The token stream of data/<domain>/<split> as a read-only np.memmap, from the cache when the tokenizer, the
    files (name, size, mtime) and the reading settings are unchanged; otherwise tokenised (write_tokens) to a
    temporary file that is renamed into place when complete (a killed run leaves only that, swept by the next one,
    which starts over). The val split of a domain without val/ is the documents held out of its train files
    (held_out_documents); its train split leaves them out with skip_held_out (as training must:
    parallel.tokenize_once), else it is every document of train/."""
    files = corpus_files(data_root, domain, split)
    held_out = holds_out(data_root, domain) and (split == "val" or skip_held_out)
    key = hashlib.sha256(f"{tokenizer.fingerprint}\0{text_key}\0{piece_chars}\0{held_out and HELD_OUT}\0".encode())
    for path in files:
        st = os.stat(path)
        key.update(f"{os.path.relpath(path, data_root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    dtype = np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32
    cache = os.path.join(data_root, domain, ".tokens")
    bin_path = os.path.join(cache, f"{split}-{key.hexdigest()[:16]}.bin")
    sweep_temporaries(cache)  # a killed tokenisation's partial file (hundreds of MB, kept by nobody)
    if os.path.exists(bin_path):
        return np.memmap(bin_path, dtype=dtype, mode="r")

    os.makedirs(cache, exist_ok=True)
    keep = None
    if held_out:
        held = held_out_documents(files, text_key, piece_chars)
        keep = held.__contains__ if split == "val" else lambda i: i not in held
    tmp = temporary_name(bin_path)  # unique: two processes tokenising at once never write one file
    try:
        n_tokens = write_tokens(tokenizer, files, tmp, dtype, batch_bytes, f"tokenizing {domain}/{split}", text_key,
                                piece_chars, keep)
        if n_tokens == 0:
            raise ValueError(f"{os.path.join(data_root, domain, split)}/: the corpus is empty")
        commit(tmp, bin_path)  # readers see no cache or a complete one, never a partial file
    finally:
        if os.path.exists(tmp):  # a failed tokenisation leaves nothing behind
            os.remove(tmp)
    for name in os.listdir(cache):  # drop this split's stale caches (other tokenizer or older text)
        if name.startswith(f"{split}-") and name.endswith(".bin") and name != os.path.basename(bin_path):
            with contextlib.suppress(FileNotFoundError):  # another process may have dropped it first
                os.remove(os.path.join(cache, name))
    return np.memmap(bin_path, dtype=dtype, mode="r")


def write_tokens(tokenizer, files, path, dtype, batch_bytes, desc, text_key=TEXT_KEY, piece_chars=PIECE_CHARS,
                 keep=None):
    """Tokenise the documents of files (those whose index keep(i) accepts, or all) in batches of about batch_bytes
    with tiktoken's multi-threaded batch encoder (every core) and stream the ids to path, each document followed by
    end-of-text (and preceded by begin-of-text where the family uses one: Tokenizer.document_ids), fsynced. Memory:
    one batch and its ids. The progress bar counts the bytes of the files on disk and shows tokens/s. Returns the
    number of tokens written."""
    bos, eos = tokenizer.document_ids()
    n_tokens, start = 0, time.perf_counter()
    with open(path, "wb") as out, \
            tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True, desc=desc) as bar:
        def flush(batch):  # [(text, first piece of its document, last piece)]
            nonlocal n_tokens
            ids = tokenizer.encode_batch([text for text, _, _ in batch])
            lengths = np.array([len(d) for d in ids], dtype=np.int64)
            arr = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=lengths.sum())
            ends = np.cumsum(lengths)
            first, last = (np.array([piece[k] for piece in batch], dtype=bool) for k in (1, 2))
            where, what = [ends[last]], [np.full(last.sum(), eos)]  # doc eos doc eos ... (numpy, not per token)
            if bos is not None:  # (listed after the eos: at a shared position np.insert keeps eos first)
                where.append((ends - lengths)[first])
                what.append(np.full(first.sum(), bos))
            arr = np.insert(arr, np.concatenate(where), np.concatenate(what).astype(dtype))
            arr.tofile(out)
            n_tokens += len(arr)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)

        batch, size, doc, first = [], 0, 0, True
        for file in files:
            done = 0
            for text, last, read in read_pieces(file, text_key, piece_chars):
                if keep is None or keep(doc):
                    batch.append((text, first, last))
                    size += len(text)
                first, doc = last, doc + last
                if size >= batch_bytes:
                    flush(batch)
                    batch, size = [], 0
                bar.update(read - done)
                done = read
            bar.update(os.path.getsize(file) - done)
        if batch:
            flush(batch)
        out.flush()
        os.fsync(out.fileno())
    return n_tokens


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


def sft_files(data_root, domain, split="train"):
    """A domain's SFT stages, data/<domain>/sft/*.jsonl in name order (the curriculum order), or their held-out
    conversations, data/<domain>/sft/val/*.jsonl. ValueError when there are none."""
    folder = Path(data_root) / domain / "sft" / ("val" if split == "val" else "")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise ValueError(f"{folder}/: no .jsonl conversation files (rows {{\"messages\": [...]}})")
    return files


# -----------------------------------------------------------------------------
# SFT batches: a curriculum of stages
#
# SOAEsV2's domain-progressive SFT trains stage by stage (weakly related conversations first, expert domain data
# last), each stage for its own epochs. A conversation is one row, right-padded to the longest row of its batch:
# padding sits after the real tokens, so causal attention never lets a conversation see another one, and its
# labels are IGNORE, so it carries no loss. To keep padding small, rows are sorted by length inside shuffled pools
# of a few batches ("length bucketing") and the batches of a pool are then shuffled again.

def sft_row(tokenizer, messages, seq_len, where=None):
    """(ids, labels) for one conversation: labels are the next token where the mask trains it, else IGNORE;
    cut to seq_len + 1 tokens (returns the row and whether it was cut). where ("file:line") prefixes an error."""
    try:
        ids, mask = render_chat(tokenizer, messages)
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where else str(e)) from None
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    cut = len(ids) > seq_len + 1
    return ids[:seq_len + 1], labels[:seq_len], cut


class Curriculum:
    """The batches of an SFT run. stages: [(name, rows, epochs)] with rows [(ids, labels)], epochs a number > 0
    (0.5: half the stage's rows, drawn at random, each once). Step s's global batch
    is a pure function of (seed, s): batch(s) -> int64 [batch_size, 2, width] (ids[:-1] and labels, stacked), so a
    resumed run sees exactly the batches it would have seen. single_stage=True pools every stage's epochs into one
    shuffled stage: SOAEsV2's ablation baseline (the same examples, no order)."""

    def __init__(self, stages, batch_size, seed, single_stage=False, pool_batches=8, pad_id=0):
        self.batch_size, self.pad_id = batch_size, pad_id
        rng = np.random.default_rng(seed)
        plan = []  # per stage: the row order over all its epochs (a fraction of one: the first rows of a shuffle)
        for name, rows, epochs in stages:
            order = np.concatenate([rng.permutation(len(rows)) for _ in range(math.ceil(epochs))])
            plan.append((name, rows, order[:max(1, round(epochs * len(rows)))]))
        if single_stage:
            rows = [r for _, rs, order in plan for r in (rs[i] for i in order)]
            plan = [("+".join(name for name, _, _ in plan), rows, rng.permutation(len(rows)))]
        self.stages, self.batches = [], []  # stages: (name, first step, number of steps)
        for name, rows, order in plan:
            steps = math.ceil(len(order) / batch_size)
            order = np.resize(order, steps * batch_size)  # fill the last batch, cycling (fewer rows than a batch too)
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
