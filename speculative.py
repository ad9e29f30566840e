"""Autoregressive and speculative sampling on model.py's static KV cache.

    generate(model, prompt_ids, max_new_tokens)                   one token per forward pass
    speculative_generate(target, draft, prompt_ids, max_new_tokens, gamma=4)

Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et
al. 2023, "Accelerating LLM Decoding with Speculative Sampling"): a small draft model proposes gamma tokens, the
target scores them all in one forward pass, and a rejection step keeps a prefix of them such that the output is
distributed exactly as the target's own samples. Decoding is memory-bound, so one target pass over gamma + 1
tokens costs about as much as a pass over one: each accepted draft token is a target pass saved.

Both caches are static and indexed by absolute position (gpt-fast's design): a rejected draft token's cache entry is
never erased, it is just overwritten by the next round, and the causal mask hides it until then.

    python speculative.py --target out/telco-sft --draft out/draft --prompt "What is VoLTE?"
    python speculative.py --target out/telco-sft --draft out/draft --bench
"""
import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from chat import add_chat_template_flag, end_of_turn_id, render_chat, use_chat_template
from data import read_jsonl
from draft_vocab import DRAFT_VOCAB, fit_vocab, prune_head
from files import write_atomic
from model import Transformer, pack, to_dtype
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# Sampling


def logits_to_probs(logits, temperature=0.0, top_k=None, top_p=None):
    """The processed next-token distribution [..., vocab] in fp32: temperature, then top-k, then top-p (nucleus),
    in the order transformers applies them. Temperature 0 is greedy: all mass on the argmax. Speculative sampling
    compares these processed distributions, so its output follows the processed target distribution exactly."""
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        # keep the most likely tokens until their mass reaches top_p: drop a token when the mass of the tokens
        # ranked above it is already >= top_p (the top token is always kept)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits.softmax(-1)


def sample(probs):
    """One draw per row of probs [..., vocab] -> [...]: argmax(p / E) with E ~ Exp(1) picks token i with
    probability p_i (an exponential race), with no host-device sync, unlike torch.multinomial. Greedy
    (one-hot) rows give their argmax."""
    race = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1)


# -----------------------------------------------------------------------------
# Decoding


def model_forward(model, idx, input_pos, unpadded=None):
    """One cached forward pass; replaced by a compiled version by compile_decoding()."""
    return model(idx, input_pos, unpadded=unpadded)


def compile_decoding():
    """torch.compile every cached pass (decode steps, the draft's, the target's verification: a graph per shape). On
    GPU "reduce-overhead" captures each in a CUDA graph (as gpt-fast does), and each call starts a new graph step:
    unmarked, CUDA graph trees re-recorded at every switch of graph (an H200: plain decoding beside speculative 38
    tokens/s, marked 697). No caller keeps an output past the next call, which marking requires."""
    global model_forward
    cuda, eager = torch.cuda.is_available(), model_forward
    compiled = torch.compile(eager, mode="reduce-overhead" if cuda else "default", fullgraph=True, dynamic=False)

    def model_forward(model, idx, input_pos, unpadded=None):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, idx, input_pos, unpadded)


def ensure_cache(model, length, batch=1):
    """A KV cache for `batch` rows and at least `length` positions (kept between calls when big enough)."""
    if length > model.config.max_seq_len:
        raise ValueError(f"prompt + new tokens need {length} positions; the model's max_seq_len is "
                         f"{model.config.max_seq_len}")
    if model.max_batch_size < batch or model.max_seq_len < length:
        model.setup_cache(max(batch, model.max_batch_size), min(model.config.max_seq_len, max(length, 256)))


def cut_at_eos(tokens, eos_id):
    """The generated tokens, cut after the first eos_id."""
    if eos_id is not None and eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1]
    return tokens


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             sync_every=16):
    """Autoregressive decoding: prefill the prompt, then one token per forward pass on the KV cache. Returns the new
    tokens (up to and including eos_id). Tokens stay on the device and are checked for eos every sync_every steps,
    so the loop does not wait on the GPU after each token (output is the same; up to sync_every - 1 forward passes
    may run past eos). generate_batch with one row."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, eos_id,
                          sync_every=sync_every)[0]


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                   generators=None, sync_every=16):
    """generate() for several prompts in one forward pass per token: the prompts are left-padded to one width W,
    so every row's next token goes to the same cache column W + i, and `unpadded` hides each row's padding from
    attention (Transformer.forward). Returns one list of new tokens per prompt, each cut after eos_id; decoding
    stops when every row has produced it (or after max_new_tokens). generators: one torch.Generator per row, so a
    row's sample does not depend on the rows beside it (distill.py draws each prompt under its own seed); None for
    a row decoded greedily beside sampled ones."""
    device = model.lm_head.weight.device
    B, W = len(prompts), max(map(len, prompts), default=0)
    if B == 0 or min(map(len, prompts)) == 0 or max_new_tokens < 1:
        raise ValueError("generate_batch needs non-empty prompts and max_new_tokens >= 1")
    ensure_cache(model, W + max_new_tokens, B)
    pad = torch.tensor([W - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (W - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    # no padding (one prompt, or prompts of one length): plain causal attention on the cache
    unpadded = torch.arange(model.max_seq_len, device=device)[None] >= pad[:, None] if pad.any() else None

    def draw(logits):
        if temperature == 0:  # greedy: the argmax itself (an exponential race over a one-hot row costs a step's 9 %)
            return logits.argmax(-1)
        probs = logits_to_probs(logits, temperature, top_k, top_p)
        if generators is None:
            return sample(probs)
        race = torch.stack([torch.empty_like(p).exponential_(1, generator=g) if g is not None else torch.ones_like(p)
                            for p, g in zip(probs, generators)])  # (a row without a generator: its argmax)
        return torch.argmax(probs / race, dim=-1)  # sample()'s exponential race, one stream per row

    # only the prompt's last position goes through the output layer (the others' logits, 262,144 wide on Gemma-3,
    # would cost more than the trunk and go unread)
    token = draw(model.lm_head(model.hidden(idx, torch.arange(W, device=device), unpadded)[:, -1]))
    new = [token]
    input_pos = torch.tensor([W], device=device)
    for i in range(1, max_new_tokens):
        if eos_id is not None and i % sync_every == 0 and (torch.stack(new) == eos_id).any(0).all():
            break
        token = draw(model_forward(model, token[:, None], input_pos, unpadded)[:, -1])
        new.append(token)
        input_pos += 1
    return [cut_at_eos(row, eos_id) for row in torch.stack(new, 1).tolist()]


@torch.no_grad()
def speculative_generate(target, draft, prompt_ids, max_new_tokens, gamma=4, temperature=0.0, top_k=None,
                         top_p=None, eos_id=None):
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2) for batch 1.
    Returns (new tokens, stats). Each round:

      1. the draft proposes x_1..x_gamma, sampling each from its processed distribution q_i;
      2. the target scores the last accepted token and all gamma drafts in ONE forward pass: p_1..p_{gamma+1};
      3. draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), in order, until the first rejection;
      4. at a rejection (position n + 1) a token is drawn from norm(max(0, p - q)), the residual; if all gamma
         are accepted, a bonus token is drawn from p_{gamma+1}. Padding q with a zero row makes both cases one
         draw from norm(max(0, p_{n+1} - q_{n+1})).

    Every token comes out of this loop (the prompt's last token starts the first round), so the output is exactly
    distributed as target samples; at temperature 0 all distributions are one-hot and it equals greedy decoding
    of the target. One host sync per round, to read how many drafts were accepted."""
    device = target.lm_head.weight.device
    T = len(prompt_ids)
    if T == 0 or max_new_tokens < 1:
        raise ValueError("speculative_generate needs a non-empty prompt and max_new_tokens >= 1")
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    for m in (target, draft):
        ensure_cache(m, T + max_new_tokens + gamma + 1)
    V = target.config.vocab_size
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    # prefill all but the last prompt token (the KV cache alone: no logits); the last one is fed to both models by
    # the first round
    if T > 1:
        target.hidden(prompt[None, :-1], torch.arange(T - 1, device=device))
        draft.hidden(prompt[None, :-1], torch.arange(T - 1, device=device))
    stats = dict(gamma=gamma, rounds=0, target_calls=1 if T > 1 else 0, draft_calls=1 if T > 1 else 0,
                 accepted=0, rejected=0)
    out = []
    pos = T - 1                  # position of the last accepted token (the first the target reads this round)
    last = prompt[-1:]           # that token
    draft_in = prompt[-1:]       # the tokens the draft's cache lacks, ending with `last`
    zero_row = torch.zeros(1, V, device=device)
    draft_ids = getattr(draft, "vocab_ids", None)  # a reduced draft vocabulary: the ids its outputs stand for
    while len(out) < max_new_tokens:
        # 1. draft gamma tokens; its first call also catches up on tokens it has not seen
        drafts, qs = [], []
        tokens, positions = draft_in, torch.arange(pos - len(draft_in) + 1, pos + 1, device=device)
        for i in range(gamma):
            logits = model_forward(draft, tokens[None], positions)[0, -1]
            q = logits_to_probs(fit_vocab(logits, V, draft_ids), temperature, top_k, top_p)
            x = q.argmax() if temperature == 0 else sample(q)  # (greedy: q is one-hot)
            drafts.append(x)
            qs.append(q)
            tokens, positions = x[None], positions[-1:] + 1
        drafts, q = torch.stack(drafts), torch.stack(qs)                           # [gamma], [gamma, V]
        # 2. the target scores last + drafts at positions pos .. pos + gamma in one pass (compiled too, --compile)
        logits = model_forward(target, torch.cat([last, drafts])[None],
                               torch.arange(pos, pos + gamma + 1, device=device))[0]
        p = logits_to_probs(logits, temperature, top_k, top_p)                   # [gamma + 1, V]
        # 3. accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); n = drafts accepted before the first reject
        i = torch.arange(gamma, device=device)
        accept = torch.rand(gamma, device=device) * q[i, drafts] < p[i, drafts]
        n = accept.long().cumprod(0).sum()
        # 4. residual (or bonus) draw from norm(max(0, p_{n+1} - q_{n+1})), with q_{gamma+1} = 0
        residual = (p[n] - torch.cat([q, zero_row])[n]).clamp(min=0)
        residual = torch.where(residual.sum() > 0, residual, p[n])  # p == q up to rounding: draw from p
        bonus = residual.argmax() if temperature == 0 else sample(residual)
        n, *new = torch.cat([n[None], drafts, bonus[None]]).tolist()   # the round's one host sync
        new = new[:n] + new[-1:]
        stats["rounds"] += 1
        stats["target_calls"] += 1
        stats["draft_calls"] += gamma
        stats["accepted"] += n
        stats["rejected"] += n < gamma
        out += new
        # The draft's cache holds last, x_1 .. x_{gamma-1}: next round it reads the bonus token, and x_gamma
        # before it when all drafts were accepted.
        draft_in = torch.cat([drafts[-1:], bonus[None]]) if n == gamma else bonus[None]
        last = bonus[None]
        pos += n + 1
        if eos_id is not None and eos_id in new:
            break
    out = cut_at_eos(out, eos_id)[:max_new_tokens]
    return out, finish_stats(stats)


def finish_stats(stats):
    """Add the rates. acceptance_rate estimates alpha, the chance that one draft token is accepted: accepted over
    drafts tested (a round stops testing at its first rejection, so the drafts after it do not count).
    mean_accepted_tokens is the tokens each target call produced; Leviathan et al. eq. (1) expects
    (1 - alpha^(gamma+1)) / (1 - alpha)."""
    tested = stats["accepted"] + stats["rejected"]
    stats["acceptance_rate"] = stats["accepted"] / tested if tested else 0.0
    stats["mean_accepted_tokens"] = (stats["accepted"] + stats["rounds"]) / max(stats["rounds"], 1)
    return stats


def pooled_stats(runs, gamma):
    """The stats of several speculative_generate calls as one: counts summed, rates over all of them (so a long
    answer weighs by its drafts, not as one vote)."""
    counts = ("rounds", "target_calls", "draft_calls", "accepted", "rejected")
    return finish_stats(dict(gamma=gamma, **{k: sum(r[k] for r in runs) for k in counts}))


def predicted_speedup(alpha, gamma, c, verify=1.0):
    """Leviathan et al. 2023, Theorem 3.8: expected walltime improvement (1 - a^(g+1)) / ((1 - a)(g c + 1)), with
    c the cost of a draft forward pass relative to the target's (their eq. 1 over the cost of a round). verify is
    the cost of the target's pass over g + 1 tokens relative to a one-token pass, 1 in the theorem."""
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + verify)


# -----------------------------------------------------------------------------
# Loading target and draft


def check_same_tokenizer(a, b, a_name="target", b_name="draft"):
    """Speculative decoding and distillation compare the two models' distributions id by id, so both must use one
    tokenizer. A model vocabulary padded past the tokenizer (Qwen's) is fine: only the real tokens must agree."""
    if a.special_tokens != b.special_tokens or a.mergeable_ranks != b.mergeable_ranks:
        ranks_a, ranks_b = ({i: t for t, i in r.items()} for r in (a.mergeable_ranks, b.mergeable_ranks))
        diff = next((i for i in sorted(set(ranks_a) | set(ranks_b)) if ranks_a.get(i) != ranks_b.get(i)), None)
        detail = (f"token id {diff} is {ranks_a.get(diff)!r} in the {a_name} and {ranks_b.get(diff)!r} in the "
                  f"{b_name}" if diff is not None else f"special tokens differ: {a.special_tokens} vs "
                  f"{b.special_tokens}")
        raise ValueError(f"the {a_name} ({a.source}) and the {b_name} ({b.source}) have different tokenizers "
                         f"({a.n_vocab} and {b.n_vocab} tokens; {detail}); they must share one")


def is_chat_model(model, tokenizer):
    """A chat (instruction-tuned) model stops at the end-of-turn token: its config.json lists it among eos_token_id,
    as Qwen2.5-Instruct, Llama-3-Instruct and SmolLM2-Instruct do and sft.py writes. A base model's doesn't."""
    eot, eos = end_of_turn_id(tokenizer), model.config.eos_token_id
    return eot is not None and eot in (eos if isinstance(eos, list) else [eos])


def stop_id(model, tokenizer):
    """Where generation stops: the end-of-turn token for a chat model, else end of text."""
    return end_of_turn_id(tokenizer) if is_chat_model(model, tokenizer) else tokenizer.eos_id


def decode_dtype(name, device):
    """--dtype for decoding and evaluation: the named dtype, by default bf16 on GPU and the checkpoint's own (None)
    elsewhere."""
    return to_dtype(name) if name else (torch.bfloat16 if torch.device(device).type == "cuda" else None)


def load(path, device, dtype=None):
    """(model, tokenizer) from an HF directory, ready for decoding (on an x86 CPU, its weights packed: model.pack)."""
    model = pack(Transformer.from_pretrained(path, device=device, dtype=dtype).eval())
    return model, Tokenizer.from_pretrained(path)


def load_draft(path, device, dtype=None):
    """(draft, tokenizer) from an HF directory, its head pruned to DRAFT_VOCAB's ids where the directory has one."""
    draft, tokenizer = load(path, device, dtype)
    vocab = Path(path) / DRAFT_VOCAB
    if vocab.is_file():
        ids = json.loads(vocab.read_text())["ids"]
        if not ids or min(ids) < 0 or max(ids) >= draft.config.vocab_size:
            raise ValueError(f"{vocab}: ids must be token ids of its {draft.config.vocab_size}-token vocabulary")
        prune_head(draft, ids)
    return draft, tokenizer


def truncate(model, n_layers):
    """The model cut to its first n_layers, with its final norm and head, in place: a draft that starts from the
    target's own early features (distill.py --student-layers, bench.py --draft-layers, gpu_check.py)."""
    del model.model.layers[n_layers:]
    model.config = replace(model.config, n_layers=n_layers)
    return model


def prompt_ids(model, tokenizer, prompt, chat=True):
    """A user prompt as ids: chat-rendered with the generation header for chat models, else plain text."""
    if chat and is_chat_model(model, tokenizer):
        return render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)


# -----------------------------------------------------------------------------
# Timing: decode steps, the costs Leviathan et al.'s speedup depends on, the memory roofline


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(fn(), its wall time in seconds), waiting for the GPU before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


@torch.no_grad()  # (recording autograd would be timed too, and would make the KV cache require gradients)
def step_time(model, n_tokens=1, steps=16, repeats=5):
    """Seconds per cached forward pass over n_tokens: 1 is the decode step that decoding repeats, gamma + 1 the
    target's verification pass (called as speculative_generate calls them). The median of `repeats` timings of
    `steps` passes: on a busy machine a single timing can be off by a third."""
    device = model.lm_head.weight.device
    ensure_cache(model, steps + n_tokens + 8)
    tokens = torch.zeros(1, n_tokens, dtype=torch.long, device=device)
    for _ in range(3):  # warm up (and compile)
        model_forward(model, tokens, torch.arange(n_tokens, device=device))
    times = [timed(lambda: [model_forward(model, tokens, torch.arange(i, i + n_tokens, device=device))
                            for i in range(steps)], device)[1] / steps for _ in range(repeats)]
    return statistics.median(times)


def cost_ratio(target, draft, target_step=None):
    """c: the time of one draft decode step over one target decode step (Leviathan et al.'s cost coefficient).
    target_step: the target's step time, if it was measured already."""
    return step_time(draft) / (target_step or step_time(target))


def verify_cost(target, gamma, target_step=None):
    """The time of the target's pass over gamma + 1 tokens over its one-token step. Leviathan et al. take it as 1:
    decoding is memory-bound, so reading the weights once costs the same for 1 or gamma + 1 tokens. That holds on
    a GPU; on a CPU the matmuls of a small model are compute-bound and it is well above 1."""
    return step_time(target, gamma + 1) / (target_step or step_time(target))


def weight_bytes(model):
    """Bytes of weights one decoding step reads: every matmul weight and the head, not the embedding table (one row
    of it is looked up) unless it IS the head (tied). KV-cache reads are left out (short contexts)."""
    return model.config.num_params(embedding=model.config.tie_embeddings) * model.lm_head.weight.dtype.itemsize


def copy_bandwidth(device, nbytes):
    """(seconds, bytes/s) of the fastest of 5 copies of an nbytes tensor into another: each byte is read once and
    written once, as decoding reads each weight once per token. The measured figure, not the data sheet's: batch-1
    decoding can go no faster than bandwidth / weight_bytes tokens/s (its memory roofline)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # (first touch of the pages, kernel load)
    seconds = min(timed(lambda: dst.copy_(src), device)[1] for _ in range(5))
    return seconds, 2 * nbytes / seconds


def compare_decoders(decoders, prompts, device):
    """Decode every prompt with each of decoders (each: prompt ids -> new token ids) in turn, so that a busy moment
    on the machine hits all of them, after one untimed warm-up of each on the longest prompt (caches at full size,
    kernels, compilation). Returns, per decoder, (tokens, seconds, outputs identical to the first decoder's)."""
    from tqdm import tqdm
    longest = max(prompts, key=len)
    for decode in decoders:
        decode(longest)
    totals = [[0, 0.0, 0] for _ in decoders]
    for ids in tqdm(prompts, desc="decoding", unit="prompt"):
        first = None
        for decode, total in zip(decoders, totals):
            new, t = timed(lambda: decode(ids), device)
            first = new if first is None else first
            total[0], total[1], total[2] = total[0] + len(new), total[1] + t, total[2] + (new == first)
    return [tuple(total) for total in totals]


# -----------------------------------------------------------------------------
# Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", required=True, help="HF directory of the target model")
    p.add_argument("--draft", help="HF directory of the draft model (same tokenizer); without it, plain decoding")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    p.add_argument("--prompts", default="data/telco/eval/qa.jsonl",
                   help="--bench without --prompt: a .jsonl with a 'prompt' per row")
    p.add_argument("--n-prompts", type=int, default=8, help="--bench: prompts taken from --prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gamma", type=gammas, default=[4], metavar="G[,G...]", help="draft tokens per round; --bench "
                   "takes a list (e.g. 1,2,3,4) and measures each against the same plain decoding")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as plain text even to a chat model")
    add_chat_template_flag(p, "the prompts of a chat target (one whose config.json stops at the template's "
                           "end-of-turn token)", exports=False)
    p.add_argument("--bench", action="store_true",
                   help="time autoregressive vs speculative decoding on the same prompts")
    p.add_argument("--compile", action="store_true", help="torch.compile every cached pass (CUDA graphs on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--json", help="--bench: also write the results to this JSON file")
    args = p.parse_args(argv)
    check_sampling_flags(p, args)
    if len(args.gamma) > 1 and not args.bench:
        p.error(f"--gamma {','.join(map(str, args.gamma))}: a list of values needs --bench (decoding uses one)")
    return args


def check_sampling_flags(p, args):
    """Refuse, naming the flag, what would silently sample nonsense: top-p outside (0, 1] (NaN probabilities),
    a negative temperature (the least likely tokens), top-k < 1; and counts below 1."""
    rules = [("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0: greedy)"),
             ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, ">= 1"),
             ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]")]
    rules += [(f"--{name.replace('_', '-')}", getattr(args, name), getattr(args, name) >= 1, ">= 1")
              for name in ("max_new_tokens", "n_prompts") if hasattr(args, name)]
    for flag, value, ok, rule in rules:
        if not ok:
            p.error(f"{flag} must be {rule}, got {value}")
    if any(not text.strip() for text in getattr(args, "prompt", None) or []):
        p.error("--prompt is empty: give the text to continue")


def gammas(text):
    """--gamma: a whole number >= 1, or a comma list of them."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 (e.g. 4 or 1,2,3,4), got {text!r}")
    return values


def bench_prompts(args):
    if args.prompt:
        return args.prompt
    path = Path(args.prompts)
    if not path.is_file():
        raise SystemExit(f"--bench: {path} not found; give --prompt or --prompts FILE")
    prompts = [r["prompt"] for _, r in read_jsonl(path) if isinstance(r.get("prompt"), str)]
    if not prompts:
        raise SystemExit(f"--bench: {path} has no rows with a 'prompt' string")
    return prompts[:args.n_prompts]


def bench(args, target, draft, tokenizer, device):
    """Autoregressive and speculative decoding (at each --gamma) of the same prompts, each prompt through all of
    them in turn: tokens/s, measured speedup, and the speedup Leviathan et al. predict from the measured acceptance
    rate and cost ratio. Returns (and writes to --json) the row of the fastest gamma, with every gamma's row in
    by_gamma when there are several."""
    prompts = [prompt_ids(target, tokenizer, p, not args.no_chat) for p in bench_prompts(args)]
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=stop_id(target, tokenizer))
    runs = {gamma: [] for gamma in args.gamma}

    def autoregressive(ids):
        torch.manual_seed(args.seed)
        return generate(target, ids, args.max_new_tokens, **kw)

    def speculative(gamma):
        def decode(ids):
            torch.manual_seed(args.seed)
            new, stats = speculative_generate(target, draft, ids, args.max_new_tokens, gamma=gamma, **kw)
            runs[gamma].append(stats)
            return new
        return decode
    (ar_tokens, ar_time, _), *timings = compare_decoders([autoregressive] + [speculative(g) for g in args.gamma],
                                                         prompts, device)
    one = step_time(target)  # (the target's one-token step, once for c and every gamma's verification cost)
    c, rows = cost_ratio(target, draft, one), []
    for gamma, (sp_tokens, sp_time, same) in zip(args.gamma, timings):
        stats = pooled_stats(runs[gamma][1:], gamma)  # runs[gamma][0] is the warm-up
        a, v = stats["acceptance_rate"], verify_cost(target, gamma, one)
        rows.append(dict(prompts=len(prompts), gamma=gamma, temperature=args.temperature,
                         autoregressive_tokens_per_s=ar_tokens / ar_time, speculative_tokens_per_s=sp_tokens / sp_time,
                         measured_speedup=(sp_tokens / sp_time) / (ar_tokens / ar_time),
                         acceptance_rate=a, mean_accepted_tokens=stats["mean_accepted_tokens"], cost_ratio=c,
                         predicted_speedup=predicted_speedup(a, gamma, c), verify_cost=v,
                         predicted_speedup_measured_verify=predicted_speedup(a, gamma, c, v),
                         identical_outputs=f"{same}/{len(prompts)}", device=str(device)))
    greedy = args.temperature == 0
    print(f"autoregressive decoding of the target: {ar_tokens / ar_time:.1f} tokens/s; draft/target cost c = "
          f"{c:.3f}\n\n| gamma | speculative tokens/s | measured speedup | acceptance | tokens per target call | "
          f"verify pass, in steps | predicted (verify 1) | predicted (verify measured) |"
          + (" identical outputs |" if greedy else "") + "\n" + "| --- " * (8 + greedy) + "|")
    for r in rows:
        print(f"| {r['gamma']} | {r['speculative_tokens_per_s']:.1f} | {r['measured_speedup']:.2f}x | "
              f"{r['acceptance_rate']:.3f} | {r['mean_accepted_tokens']:.2f} | {r['verify_cost']:.2f} | "
              f"{r['predicted_speedup']:.2f}x | {r['predicted_speedup_measured_verify']:.2f}x |"
              + (f" {r['identical_outputs']} |" if greedy else ""))
    print("\n(Leviathan et al.'s Theorem 3.8 takes the target's pass over gamma + 1 tokens to cost one step; the "
          "last prediction uses the measured cost)")
    result = max(rows, key=lambda r: r["measured_speedup"])
    if len(rows) > 1:
        result = {**result, "by_gamma": rows}
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    dtype = decode_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    try:
        target, tokenizer = load(args.target, device, dtype)
        use_chat_template(tokenizer, args.chat_template)
        draft = None
        if args.draft:
            draft, draft_tokenizer = load_draft(args.draft, device, dtype)
            check_same_tokenizer(tokenizer, draft_tokenizer)
        if args.compile:
            compile_decoding()
        if args.bench:
            if draft is None:
                raise SystemExit("--bench compares with speculative decoding: give --draft")
            bench(args, target, draft, tokenizer, device)
            return
        if not args.prompt:
            raise SystemExit("give --prompt TEXT (or --bench)")
        answer(args, target, draft, tokenizer)
    except (FileNotFoundError, ValueError) as e:  # a malformed --prompts row, named by file:line; a prompt and
        raise SystemExit(f"error: {e}")           # --max-new-tokens past the model's context


def answer(args, target, draft, tokenizer):
    """Decode each --prompt, plainly or with the draft, and print the text (and the draft's statistics)."""
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=stop_id(target, tokenizer))
    for text in args.prompt:
        ids = prompt_ids(target, tokenizer, text, not args.no_chat)
        if draft is None:
            new, stats = generate(target, ids, args.max_new_tokens, **kw), None
        else:
            new, stats = speculative_generate(target, draft, ids, args.max_new_tokens, gamma=args.gamma[0], **kw)
        if new and new[-1] == kw["eos_id"]:
            new = new[:-1]
        print(tokenizer.decode(new))
        if stats:
            print(f"[acceptance rate {stats['acceptance_rate']:.3f}, {stats['mean_accepted_tokens']:.2f} tokens "
                  f"per target call, {stats['target_calls']} target / {stats['draft_calls']} draft calls]",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
