"""Byte-level BPE training (Sennrich et al. 2016; on bytes as in GPT-2) for from-scratch models: Tokenizer.train's
merges. Imports nothing of this project's, so tokenizer.py (which wraps it) stays the one door."""
import heapq
import re
import unicodedata
from collections import Counter, defaultdict

from tqdm import tqdm

# The trainer splits text with Python's `re`, which has no \p{L} / \p{N}, so this approximates tokenizer.py's
# LLAMA3_PATTERN (what a trained tokenizer saves): a letter is a word character that is not a decimal digit or "_", a
# number is a decimal digit. That only changes which merges are learned, never whether encode() matches HF: encoding
# always splits with the exact saved pattern.
TRAIN_SPLIT = re.compile(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}"""
                         r"""| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_bpe(texts, n_merges):
    """Up to n_merges merges learned from an iterable of strings: (vocab, merges), vocab the bytes of each id (0-255
    the single bytes in byte order, then one per merge), merges the (id_a, id_b) pairs in merge order. Fewer when
    the text runs out of pairs to merge."""
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
    return vocab, merges


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
