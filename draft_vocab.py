"""A draft with a reduced vocabulary (FR-Spec, Zhao et al. 2025; EAGLE-3's draft-to-target map).

A small draft spends most of a decoding step in its output layer: SmolLM2's 49,152 x 576 embedding is 28M of a
4-layer draft's 42M parameters. The draft's head can score only the K most frequent tokens: speculative sampling
is exact for ANY draft distribution q (Leviathan et al., Theorem 3.5), so a q that is zero outside those K still
gives exactly the target's distribution, and greedy output is unchanged.

    kept = frequent_vocab(counts, 4096, keep=[eos])   the K ids (distill.py --draft-vocab counts the domain corpus)
    prune_head(draft, kept)                            its output layer scores those K only
    fit_vocab(draft_logits, V, draft.vocab_ids)        back on the target's V ids, -inf elsewhere (q = 0 there)

The exported draft stays a whole HF model (transformers loads it with its full head); DRAFT_VOCAB lists the kept
ids beside its config.json, and speculative.load_draft prunes the head when it loads one.
"""
import math

import torch
import torch.nn.functional as F

from model import Head

DRAFT_VOCAB = "draft_vocab.json"  # a draft's reduced output vocabulary, next to its config.json


def frequent_vocab(counts, k, keep=()):
    """The k most frequent token ids by counts (ties: the lower id), with `keep` (the stop tokens, so the draft can
    end a turn) always in; sorted."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if not 0 < k <= len(counts):
        raise ValueError(f"a reduced draft vocabulary of {k} tokens: not between 1 and {len(counts)}")
    order = torch.argsort(-counts, stable=True)[:k].tolist()
    return sorted(set(order) | {i for i in keep if i is not None and 0 <= i < len(counts)})


def prune_head(model, ids):
    """The draft scores only `ids`: its output layer becomes their rows of the (tied or not) output weights, a
    K x dim copy for decoding (training keeps the whole head); model.vocab_ids maps its outputs back to ids."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.lm_head.weight.device)
    head = Head(model.config.dim, len(ids), bias=False, device=ids.device, dtype=model.lm_head.weight.dtype)
    head.weight = torch.nn.Parameter(model.lm_head.weight.detach()[ids].clone(), requires_grad=False)
    head.cap = model.lm_head.cap
    if model.lm_head.packed:  # (a model ready for decoding: model.pack)
        head.pack()
    model.lm_head, model.vocab_ids = head, ids
    return model


def fit_vocab(logits, size, ids=None):
    """The draft's logits over the target's vocabulary. A draft with a reduced head (prune_head) scores only `ids`:
    every other id is -inf, so q is zero there. Models of one tokenizer may also pad their embeddings differently
    (Qwen pads to a multiple of 64 or 128): ids past the target's end are dropped, missing ones -inf. The real tokens
    are the same (speculative.check_same_tokenizer), and any draft distribution keeps speculative sampling exact."""
    if ids is not None:
        return logits.new_full((*logits.shape[:-1], size), -math.inf).index_copy_(-1, ids, logits)
    n = logits.shape[-1]
    return logits[..., :size] if n >= size else F.pad(logits, (0, size - n), value=-math.inf)
