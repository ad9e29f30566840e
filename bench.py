"""
Benchmarks of this codebase against the reference implementations people would otherwise use. Each pair runs side
by side in one process on the same inputs, first checks that both compute the same thing, and the table gives the
ratio ours / theirs of the throughput (above 1: ours is faster).

1. train     forward + backward + AdamW of model.Transformer vs transformers' AutoModelForCausalLM of the same
             config (config.to_hf()) holding the same weights, on the same batch, SDPA attention on both
2. decode    greedy speculative.generate vs transformers' generate, and speculative_generate vs transformers'
             assisted generation: same target and draft, same prompts, same number of new tokens; each against
             the memory roofline (batch-1 decoding reads every weight once per token: the copy bandwidth measured
             here over the weight bytes is as fast as it can go)
3. tokenize  tokenizer.Tokenizer.encode vs the raw tiktoken Encoding inside it vs HF tokenizers on the same
             tokenizer.json, one string and batched; with --sp-tokenizer also for a SentencePiece-style one
4. corpus    tokenising a generated corpus of gigabytes to a token shard (data.write_tokens) with our encoder vs HF
             tokenizers' batch encoder: tokens/s and peak memory, each in a fresh process (not in the default run)

    python bench.py                                  # all three: 1-2 min on a 2-core CPU
    python bench.py --only train --preset 135m --vocab-size 49152 --batch-size 8 --seq-len 1024
    python bench.py --only decode --target out/qwen-telco-sft --draft out/qwen-telco-draft --max-new-tokens 256
    python bench.py --json out/bench.json            # every number, as JSON
    python bench.py --only tokenize --tokenizer models/smollm2-135m-instruct --sp-tokenizer models/gemma3-270m
    python bench.py --only draft-vocab --target models/smollm2-135m-instruct --draft-layers 2,4,8 --gamma 1
    python bench.py --only verify --target models/smollm2-135m-instruct
    python bench.py --only corpus --corpus-gb 1 --corpus-dir /tmp/corpus-1gb --tokenizer models/smollm2-135m-instruct

On a GPU the defaults grow (the 360m preset, 8 x 2048 tokens per step), training runs under bf16 autocast over fp32
weights (as HF Trainer's bf16=True does), decoding with bf16 weights, both eager and torch.compile'd, with MFU.
Besides tests/, this is the one file that imports transformers and tokenizers: they are what we are measured against.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import tiktoken
import tokenizers
import torch
import torch.nn.functional as F
import transformers

import model
import speculative
from data import corpus_files, find_domains, read_documents, tokenize_corpus
from draft_vocab import frequent_vocab, prune_head
from files import write_atomic
from model import PRESETS, ModelConfig, Transformer, to_dtype
from speculative import (bench_prompts, check_same_tokenizer, compare_decoders, copy_bandwidth, cost_ratio, generate,
                         generate_batch, load, load_draft, pooled_stats, predicted_speedup, prompt_ids,
                         speculative_generate, step_time, stop_id, timed, truncate, weight_bytes)
from tokenizer import Tokenizer
from parallel import PEAK_FLOPS, by_gpu_name
from train import make_optimizer

PIPELINE = "bash workshop.sh makes out/workshop/telco-sft and out/workshop/telco-draft (see README.md)"


def machine(device):
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                tiktoken=tiktoken.__version__,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)


def row(what, ours, theirs, notes):
    return dict(what=what, ours=ours, theirs=theirs, ratio=ours / theirs, notes=notes)


# -----------------------------------------------------------------------------
# 1. Training step


def lm_loss(logits, y):
    """Mean next-token cross-entropy in fp32, the same function on both models' logits."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def train_step(forward, optimizer, x, y, autocast_dtype):
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = lm_loss(forward(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def bench_train(args, device):
    if args.model:
        ours = Transformer.from_pretrained(args.model, device=device, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        ours = Transformer(ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size)).to(device)
        ours.init_weights()
    config = ours.config
    # theirs: transformers' own class for our config, holding a copy of our weights (module names are HF's)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(device)
    theirs.load_state_dict(ours.state_dict())
    ours.train()
    theirs.train()
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    # Apples to apples: the same loss from both, in fp32, before any step. use_cache=False: transformers would
    # otherwise fill a KV cache in every training forward, which no one wants when training.
    with torch.no_grad():
        loss_ours = lm_loss(ours(x), y).item()
        loss_theirs = lm_loss(theirs(input_ids=x, use_cache=False).logits, y).item()
    loss_diff = abs(loss_ours - loss_theirs)
    print(f"[train] {type(theirs).__name__}, {config.num_params() / 1e6:.1f}M parameters: loss ours "
          f"{loss_ours:.6f}, theirs {loss_theirs:.6f}, |diff| {loss_diff:.1e}"
          f"{'' if loss_diff < 1e-3 else '  MISMATCH: the two models do not compute the same thing'}", flush=True)

    # the same AdamW (train.py's: no decay on norms and biases; fused on GPU) over each model's own parameters
    opt_ours, opt_theirs = make_optimizer(ours, 0.1, device), make_optimizer(theirs, 0.1, device)
    for group in opt_ours.param_groups + opt_theirs.param_groups:
        group["lr"] = 3e-4  # (train_loop sets it at every step)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    precision = "bf16 autocast, fp32 weights" if autocast else "fp32"
    peak = by_gpu_name(PEAK_FLOPS, device)
    tokens = args.batch_size * args.seq_len
    result = dict(model=type(theirs).__name__, params=config.num_params(), batch_size=args.batch_size,
                  seq_len=args.seq_len, precision=precision, loss_ours=loss_ours, loss_theirs=loss_theirs,
                  loss_match=loss_diff < 1e-3, runs={})
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        fwd_ours = torch.compile(ours) if compiled else ours
        fwd_hf = torch.compile(theirs) if compiled else theirs

        def fwd_theirs(x):  # transformers returns an output object that holds the logits
            return fwd_hf(input_ids=x, use_cache=False).logits
        times_ours, times_theirs = [], []
        for i in range(args.warmup + args.steps):  # interleaved, so a busy moment on the machine hits both
            last_ours, t_ours = timed(lambda: train_step(fwd_ours, opt_ours, x, y, autocast), device)
            last_theirs, t_theirs = timed(lambda: train_step(fwd_theirs, opt_theirs, x, y, autocast), device)
            if i >= args.warmup:  # warm-up: allocator, kernels, compilation
                times_ours.append(t_ours)
                times_theirs.append(t_theirs)
            print(f"[train] {'compiled' if compiled else 'eager'} step {i + 1}/{args.warmup + args.steps}: "
                  f"{t_ours * 1e3:.0f} ms ours, {t_theirs * 1e3:.0f} ms theirs", flush=True)
        step_ours, step_theirs = statistics.median(times_ours), statistics.median(times_theirs)
        mode = "compiled" if compiled else "eager"
        run = dict(step_s_ours=step_ours, step_s_theirs=step_theirs, time_ratio=step_ours / step_theirs,
                   tokens_per_s_ours=tokens / step_ours, tokens_per_s_theirs=tokens / step_theirs,
                   last_loss_ours=last_ours.item(), last_loss_theirs=last_theirs.item())
        notes = (f"{type(theirs).__name__}, sdpa; median ms/step {step_ours * 1e3:.1f} vs {step_theirs * 1e3:.1f}; "
                 f"loss at step 1 {loss_ours:.4f} vs {loss_theirs:.4f}, at step {args.warmup + args.steps} "
                 f"{run['last_loss_ours']:.4f} vs {run['last_loss_theirs']:.4f}")
        if peak:  # MFU (Chowdhery et al. 2022): model FLOP/s over the GPU's peak, same FLOPs count for both
            flops = config.flops_per_token(args.seq_len)
            run.update(mfu_ours=flops * run["tokens_per_s_ours"] / peak,
                       mfu_theirs=flops * run["tokens_per_s_theirs"] / peak)
            notes += f"; MFU {run['mfu_ours']:.1%} vs {run['mfu_theirs']:.1%}"
        result["runs"][mode] = run
        rows.append(row(f"train step, tokens/s ({args.batch_size}x{args.seq_len}, {precision}, {mode})",
                        run["tokens_per_s_ours"], run["tokens_per_s_theirs"], notes))
    return result, rows


# -----------------------------------------------------------------------------
# 2. Decoding


def load_hf(path, device, dtype, gamma=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    # No stopping at eos on either side, so both write exactly max_new_tokens. Set on the model's own
    # generation_config: a None passed to generate() is filled back in from it.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0  # batch 1: never used, but generate() wants one
    if gamma is not None:  # as the assistant: always gamma drafts per round, as speculative_generate does
        model.generation_config.num_assistant_tokens = gamma
        model.generation_config.num_assistant_tokens_schedule = "constant"
        model.generation_config.assistant_confidence_threshold = 0.0  # no early exit on low draft confidence
    return model


def hf_generate(model, ids, max_new_tokens, **kwargs):
    idx = torch.tensor([ids], device=model.device)
    out = model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=max_new_tokens,
                         **kwargs)
    return out[0, len(ids):].tolist()


def hf_generate_batch(model, prompts, max_new_tokens):
    """transformers' batched greedy generation: left-padded, the padding masked out by attention_mask."""
    W = max(map(len, prompts))
    idx = torch.tensor([[0] * (W - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens)
    return out[:, W:].tolist()


def time_decoding(ours_fn, theirs_fn, prompts, device):
    """Each prompt through ours then theirs (speculative.compare_decoders); tokens/s of each."""
    (n_ours, t_ours, _), (n_theirs, t_theirs, same) = compare_decoders([ours_fn, theirs_fn], prompts, device)
    return dict(tokens_per_s_ours=n_ours / t_ours, tokens_per_s_theirs=n_theirs / t_theirs, tokens_ours=n_ours,
                tokens_theirs=n_theirs, identical=same, prompts=len(prompts))


def bench_decode(args, device):
    for flag, path in (("--target", args.target), ("--draft", args.draft)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"{flag} {path}: no HF model directory there (no config.json); {PIPELINE}")
    dtype = to_dtype(args.dtype)
    target, tokenizer = load(args.target, device, dtype)
    draft, draft_tokenizer = load_draft(args.draft, device, dtype)  # (its reduced head, if it has one)
    check_same_tokenizer(tokenizer, draft_tokenizer)
    target_hf, draft_hf = load_hf(args.target, device, dtype), load_hf(args.draft, device, dtype, args.gamma)
    prompts = [prompt_ids(target, tokenizer, p) for p in bench_prompts(args)]
    N = args.max_new_tokens
    # The memory roofline: batch-1 decoding reads every weight once per token, so it can go no faster than the
    # copy bandwidth measured here over those bytes (the copy as large as the weights, so caches help it no more)
    nbytes = weight_bytes(target)
    bandwidth = copy_bandwidth(device, nbytes)[1]
    limit = bandwidth / nbytes
    print(f"[decode] copy bandwidth {bandwidth / 1e9:.1f} GB/s: batch-1 decoding at most {limit:,.1f} tokens/s for "
          f"{nbytes / 1e6:,.1f} MB of weights per token", flush=True)
    result = dict(dtype=args.dtype, max_new_tokens=N, gamma=args.gamma, weight_bytes=nbytes,
                  copy_bandwidth_bytes_per_s=bandwidth, limit_tokens_per_s=limit)
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        mode = "compiled" if compiled else "eager"
        hf_kwargs = {}
        if compiled:
            speculative.compile_decoding()  # ours: the decode step compiled (CUDA graphs on GPU)
            hf_kwargs = dict(cache_implementation="static")  # theirs: transformers compiles a static cache on GPU
        print(f"[decode] {mode}: {len(prompts)} prompts x {N} new tokens, plain greedy", flush=True)
        plain = time_decoding(lambda ids: generate(target, ids, N),
                              lambda ids: hf_generate(target_hf, ids, N, **hf_kwargs), prompts, device)
        print(f"[decode] {mode}: {args.decode_batch} prompts per forward pass, greedy", flush=True)
        batch = [prompts[i % len(prompts)] for i in range(args.decode_batch)]
        # one "prompt" of compare_decoders is the whole batch; its tokens are every row's, concatenated
        batched = time_decoding(lambda b: sum(generate_batch(target, b, N), []),
                                lambda b: sum(hf_generate_batch(target_hf, b, N), []), [batch], device)
        batched.update(prompts=args.decode_batch, identical=args.decode_batch if batched["identical"] else "not all")
        print(f"[decode] {mode}: speculative, gamma {args.gamma}", flush=True)
        runs = []

        def ours_speculative(ids):
            out, stats = speculative_generate(target, draft, ids, N, gamma=args.gamma)
            runs.append(stats)
            return out
        # transformers refuses assisted generation with a static cache: theirs stays eager, dynamic cache
        spec = time_decoding(ours_speculative, lambda ids: hf_generate(target_hf, ids, N, assistant_model=draft_hf),
                             prompts, device)
        spec.update(acceptance_rate=pooled_stats(runs[1:], args.gamma)["acceptance_rate"])
        for name, r in (("greedy decoding", plain), (f"batched greedy decoding, {args.decode_batch} rows", batched),
                        (f"speculative greedy, gamma {args.gamma}", spec)):
            same = r["identical"]  # (a count; for the batch, whose rows are compared at once, a yes or no)
            notes = (f"identical outputs {same}/{r['prompts']}" if same != "not all" else "outputs not all identical")
            notes += f"; {r['prompts']} prompts x {N} tokens"
            if name.startswith("speculative"):
                notes += (f"; acceptance {r['acceptance_rate']:.3f}; theirs: assisted generation "
                          f"(num_assistant_tokens={args.gamma}, constant), whose greedy output is also the target's "
                          f"greedy output{' (eager: no static cache for assisted generation)' if compiled else ''}")
            # (above 100 % is possible when a weight read serves several tokens: batched rows, speculative rounds)
            r.update(bandwidth_fraction_ours=r["tokens_per_s_ours"] / limit,
                     bandwidth_fraction_theirs=r["tokens_per_s_theirs"] / limit)
            notes += (f"; of the batch-1 memory roofline ({limit:,.1f} tokens/s): {r['bandwidth_fraction_ours']:.1%} "
                      f"vs {r['bandwidth_fraction_theirs']:.1%}")
            rows.append(row(f"{name}, tokens/s ({args.dtype}, {mode})", r["tokens_per_s_ours"],
                            r["tokens_per_s_theirs"], notes))
        result[mode] = dict(plain=plain, batched=batched, speculative=spec)
    return result, rows


def bench_draft_vocab(args, device):
    """FR-Spec's trade-off, measured: the draft's head over the K tokens most frequent in --domain's corpus, for each
    K of --draft-vocab-sizes (0: the whole vocabulary): the share of the corpus's tokens they cover, the draft's
    step cost c (one draft step over one target step, timed), greedy acceptance on the bench prompts, and the
    speedup Leviathan et al. predict from them. The draft is --draft, or with --draft-layers N1,N2,.. the target's
    first N layers (undistilled; distill.py --student-layers starts from them), each N a row per K: how deep a draft
    pays, measured."""
    dtype = to_dtype(args.dtype)
    target, tokenizer = load(args.target, device, dtype)
    tokens = tokenize_corpus(tokenizer, args.data_root, args.domain, "train", skip_held_out=True)
    counts = torch.bincount(torch.from_numpy(tokens.astype("int64")), minlength=target.config.vocab_size)
    prompts = [prompt_ids(target, tokenizer, p) for p in bench_prompts(args)]
    eos, one = stop_id(target, tokenizer), step_time(target)  # (the target's step, once for every row's c)
    result, rows = {}, []
    for layers in args.draft_layers or [None]:
        for k in [int(k) for k in args.draft_vocab_sizes.split(",")]:
            draft = load(args.target if layers else args.draft, device, dtype)[0]
            if layers:
                truncate(draft, layers)
            if k:
                prune_head(draft, frequent_vocab(counts, k, keep=[eos]))
            runs = [speculative_generate(target, draft, ids, args.max_new_tokens, gamma=args.gamma, eos_id=eos)[1]
                    for ids in prompts]
            a, c = pooled_stats(runs, args.gamma)["acceptance_rate"], cost_ratio(target, draft, one)
            kept = draft.vocab_ids if k else torch.arange(len(counts))
            r = dict(coverage=float(counts[kept].sum() / counts.sum()), cost_ratio=c, acceptance=a,
                     predicted_speedup=predicted_speedup(a, args.gamma, c))
            name = f"K {k or 'all'}" + (f", {layers} layers" if layers else "")
            result[name] = r
            print(f"[draft-vocab] {name}: coverage {r['coverage']:.1%}, c {c:.3f}, acceptance {a:.3f}, "
                  f"predicted {r['predicted_speedup']:.2f}x", flush=True)
    return result, rows


def bench_verify(args, device):
    """The target's verification pass over gamma + 1 = 2..5 tokens, in its one-token decode steps
    (speculative.verify_cost's ratio): in fp32 through F.linear (MKL) and through oneDNN (model.Linear's kernel on
    an x86 CPU), and in bf16; on an x86 CPU also with the weights packed in oneDNN's layout (model.pack, decoding's
    default). Leviathan et al. take it as 1 (a memory-bound step reads the weights once for any few tokens); every
    tenth above 1 comes off the speedup."""
    result, onednn = {}, model.ONEDNN
    kernels = [("float32, F.linear (MKL)", "float32", False, False), ("bfloat16", "bfloat16", onednn, False)]
    if onednn and device.type == "cpu":
        kernels[1:1] = [("float32, oneDNN (model.Linear)", "float32", True, False),
                        ("float32, oneDNN, packed (model.pack)", "float32", True, True)]
        kernels.append(("bfloat16, oneDNN, packed (model.pack)", "bfloat16", True, True))
    try:
        for name, dtype, kernel, packed in kernels:
            model.ONEDNN = kernel
            target = Transformer.from_pretrained(args.target, device=device, dtype=to_dtype(dtype)).eval()
            if packed:
                model.pack(target)
            one = step_time(target)
            result[name] = dict(step_ms=one * 1e3, **{str(n): step_time(target, n) / one for n in range(2, 6)})
            print(f"[verify] {name}: one-token step {one * 1e3:.1f} ms; pass over 2..5 tokens: " +
                  ", ".join(f"{result[name][str(n)]:.2f}" for n in range(2, 6)) + " steps", flush=True)
    finally:
        model.ONEDNN = onednn
    return result, []


# -----------------------------------------------------------------------------
# 3. Tokenisation


def bench_tokenize(args):
    path = args.tokenizer or args.target
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise SystemExit(f"--tokenizer {path}: no tokenizer.json there; {PIPELINE}")
    if args.sp_tokenizer and not os.path.isfile(os.path.join(args.sp_tokenizer, "tokenizer.json")):
        raise SystemExit(f"--sp-tokenizer {args.sp_tokenizer}: no tokenizer.json there (python prepare_real_model.py)")
    docs = [doc for domain in find_domains(args.data_root)
            for doc in read_documents(corpus_files(args.data_root, domain, "train"))]
    if not docs:
        raise SystemExit(f"--data-root {args.data_root}: no corpus found (expected <domain>/train/*.txt)")
    size = sum(len(d.encode()) for d in docs)
    docs = docs * math.ceil(args.tokenize_mb * 1e6 / size)  # repeated up to the size asked for
    text = "\n\n".join(docs)
    mb = len(text.encode()) / 1e6
    print(f"[tokenize] {mb:.1f} MB: {len(docs)} documents of data/*/train", flush=True)
    result, rows = tokenize_rows(path, "", docs, text, mb, args)
    result.update(megabytes=mb, documents=len(docs))
    if args.sp_tokenizer:  # the same rows for a SentencePiece-style tokenizer (Mistral, Gemma)
        result["sentencepiece"], sp_rows = tokenize_rows(args.sp_tokenizer, "SentencePiece-style "
                                                         f"({os.path.basename(os.path.normpath(args.sp_tokenizer))}) ",
                                                         docs, text, mb, args)
        rows += sp_rows
    return result, rows


def tokenize_rows(path, label, docs, text, mb, args):
    """Ours vs the raw tiktoken Encoding inside it vs HF tokenizers on one tokenizer.json, one string and batched.
    A SentencePiece-style tokenizer's raw Encoding runs on the text it is handed (spaces already "▁") and gives
    tiktoken's ranks, not HF's ids: the row shows what the normalising and the mapping to ids cost."""
    ours = Tokenizer.from_pretrained(path)
    theirs = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    theirs.encode_special_tokens = True  # as ours: special-token spellings in the text are text
    raw_one, raw_docs = (ours.normalize(text), [ours.normalize(d) for d in docs]) if ours.sp else (text, docs)
    result, rows = dict(nfc=ours.nfc, sentencepiece=ours.sp is not None), []
    one = (lambda: ours.encode(text), lambda: ours.enc.encode_ordinary(raw_one),
           lambda: theirs.encode(text, add_special_tokens=False).ids)
    batched = (lambda: ours.encode_batch(docs), lambda: ours.enc.encode_ordinary_batch(raw_docs),
               lambda: [e.ids for e in theirs.encode_batch(docs, add_special_tokens=False)])
    for mode, fns in (("1 string", one), (f"batch of {len(docs)} documents", batched)):
        ids, secs = [], []
        for fn in fns:  # ours, raw tiktoken, HF tokenizers; the median of --repeats encodes of the same text
            runs = [timed(fn, torch.device("cpu")) for _ in range(args.repeats)]
            ids.append(runs[0][0])
            secs.append(statistics.median(t for _, t in runs))
        ours_mb, tik_mb, hf_mb = (mb / s for s in secs)
        equal = ids[0] == ids[2] and (ours.sp is not None or ids[0] == ids[1])
        result[mode] = dict(mb_per_s_ours=ours_mb, mb_per_s_tiktoken=tik_mb, mb_per_s_hf=hf_mb, ids_equal=equal)
        notes = (f"ids equal ({'ours, HF' if ours.sp else 'ours, tiktoken, HF'}): {'yes' if equal else 'NO'}; "
                 f"{'one thread' if mode == '1 string' else 'tiktoken thread pool vs HF rayon pool'}")
        rows.append(row(f"tokenize {label}{mode}, MB/s: ours vs raw tiktoken", ours_mb, tik_mb,
                        notes + ("; ours also NFC-normalises non-ASCII text" if ours.nfc else "")
                        + ("; raw tiktoken: the normalised text, its ranks" if ours.sp else "")))
        rows.append(row(f"tokenize {label}{mode}, MB/s: ours vs HF tokenizers", ours_mb, hf_mb, notes))
    return result, rows


# -----------------------------------------------------------------------------
# 4. Tokenising a corpus of gigabytes (data.write_tokens, as train.py's first run does)
#
# The same pipeline (streamed reading, 8 MB batches, framing, writing the .bin) with our encoder and with HF
# tokenizers' batch encoder swapped in: only the encoder differs. Each side runs in a fresh process, so that its peak
# resident memory (ru_maxrss) is its own; an "idle" process that only imports and loads the tokenizer is the floor.

CORPUS_WORKER = """
import json, os, resource, sys, time
import numpy as np
from data import corpus_files, write_tokens
from tokenizer import Tokenizer
which, root, tokenizer_dir, out = sys.argv[1:5]
tok = Tokenizer.from_pretrained(tokenizer_dir)
encode, encoding = tok.encode_batch, [0.0]
if which == "hf":
    import tokenizers
    hf = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    encode = lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
def timed_encode(texts):  # (the encoder's share of the time)
    t = time.perf_counter()
    ids = encode(texts)
    encoding[0] += time.perf_counter() - t
    return ids
tok.encode_batch = timed_encode
t0 = time.perf_counter()
dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32  # as data.tokenize_corpus (Gemma's 262,144 tokens)
n = 0 if which == "idle" else write_tokens(tok, corpus_files(root, "big", "train"), out, dtype, 8 << 20, which)
print(json.dumps(dict(tokens=n, seconds=time.perf_counter() - t0, encode_seconds=encoding[0],
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def make_corpus(root, gigabytes, data_root):
    """<root>/big/train/: the documents of <data_root>/*/train repeated up to `gigabytes` GB, in 8 files: 7 .jsonl of
    {"text": ...} rows and one .txt of documents separated by blank lines (over 64 MB: read in pieces). Made once."""
    folder = os.path.join(root, "big", "train")
    done = os.path.join(root, "big", "complete")
    if os.path.exists(done):
        return folder
    docs = [d for domain in find_domains(data_root) for d in read_documents(corpus_files(data_root, domain, "train"))]
    os.makedirs(folder, exist_ok=True)
    part = int(gigabytes * 1e9 / 8)
    for i in range(8):
        name = os.path.join(folder, f"part-{i}.jsonl" if i < 7 else "book.txt")
        with open(name + ".tmp", "w", encoding="utf-8") as f:
            size, k = 0, 0
            while size < part:
                line = json.dumps({"text": docs[k % len(docs)]}) + "\n" if i < 7 else docs[k % len(docs)] + "\n\n"
                size += f.write(line)
                k += 1
        os.replace(name + ".tmp", name)
    open(done, "w").close()
    return folder


def bench_corpus(args):
    path = args.tokenizer or args.target
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise SystemExit(f"--tokenizer {path}: no tokenizer.json there")
    folder = make_corpus(args.corpus_dir, args.corpus_gb, args.data_root)
    disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"[corpus] {disk / 1e9:.2f} GB in {folder} (make it once: 7 .jsonl + one .txt)", flush=True)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    runs, digests = {}, {}
    load = os.getloadavg()
    for which in ("idle", "ours", "hf"):
        out = os.path.join(args.corpus_dir, f"tokens-{which}.bin")
        p = subprocess.run([sys.executable, "-c", CORPUS_WORKER, which, args.corpus_dir, path, out], env=env,
                           stdout=subprocess.PIPE, text=True, check=True)
        runs[which] = json.loads(p.stdout.strip().splitlines()[-1])
        if which != "idle":
            with open(out, "rb") as f:
                digests[which] = hashlib.file_digest(f, "sha256").hexdigest()
            os.remove(out)
        print(f"[corpus] {which}: {runs[which]}", flush=True)
    load = (load, os.getloadavg())
    equal = digests["ours"] == digests["hf"]
    ours, hf = (runs[w]["tokens"] / runs[w]["seconds"] for w in ("ours", "hf"))
    result = dict(bytes=disk, runs=runs, ids_equal=equal, load_average_before_after=load,
                  tokens_per_s_ours=ours, tokens_per_s_hf=hf)
    notes = (f"{disk / 1e9:.2f} GB, {runs['ours']['tokens']:,} tokens; ids equal: {'yes' if equal else 'NO'}; "
             f"load average {load[0][0]:.1f} before, {load[1][0]:.1f} after")
    rows = [row("tokenize a corpus end to end (read, encode, write), tokens/s: ours vs HF tokenizers", ours, hf, notes),
            row("  same, peak resident MB (lower is better; idle process: "
                f"{runs['idle']['peak_mb']:.0f} MB)", runs["ours"]["peak_mb"], runs["hf"]["peak_mb"], notes)]
    return result, rows


# -----------------------------------------------------------------------------
# Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="train,decode,tokenize", help="comma-separated sections to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="also time torch.compile'd models (default: on GPU)")
    p.add_argument("--json", help="write every number to this JSON file")
    g = p.add_argument_group("train")
    g.add_argument("--model", help="an HF directory to take the model from (default: --preset)")
    g.add_argument("--preset", choices=list(PRESETS), help="default: small on CPU, 360m on GPU")
    g.add_argument("--vocab-size", type=int, help="with --preset; default: 4096 on CPU, 49152 on GPU")
    g.add_argument("--batch-size", type=int, help="default: 4 on CPU, 8 on GPU")
    g.add_argument("--seq-len", type=int, help="default: 256 on CPU, 2048 on GPU")
    g.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    g = p.add_argument_group("decode")
    g.add_argument("--target", default="out/workshop/telco-sft", help="HF directory of the target model")
    g.add_argument("--draft", default="out/workshop/telco-draft", help="HF directory of the draft model")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for several; default: --prompts)")
    g.add_argument("--prompts", default="data/telco/eval/qa.jsonl", help="a .jsonl with a 'prompt' per row")
    g.add_argument("--n-prompts", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per round, both sides")
    g.add_argument("--decode-batch", type=int, default=8, help="rows of the batched decoding row (the prompts, "
                   "repeated as needed)")
    g = p.add_argument_group("draft-vocab (also --target, --draft, --prompts, --n-prompts, --max-new-tokens, --gamma)")
    g.add_argument("--draft-vocab-sizes", default="1024,4096,16384,0", help="K of each row (0: the whole vocabulary)")
    g.add_argument("--draft-layers", type=speculative.gammas, metavar="N[,N...]", help="the draft: the target's "
                   "first N layers instead of --draft (a comma list: a row for each N)")
    g.add_argument("--domain", default="telco", help="whose --data-root corpus ranks the tokens")
    g = p.add_argument_group("tokenize")
    g.add_argument("--tokenizer", help="HF directory with tokenizer.json (default: --target)")
    g.add_argument("--data-root", default="data", help="the text: every <domain>/train/ here, concatenated")
    g.add_argument("--sp-tokenizer", help="also a SentencePiece-style HF directory (e.g. "
                   "models/mistral-7b-v0.3-tokenizer, models/gemma3-270m): the same rows for it")
    g.add_argument("--tokenize-mb", type=float, default=2.0, help="the text, repeated up to this many MB")
    g.add_argument("--repeats", type=int, default=3, help="timed encodes of the text (the median is reported)")
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus-dir", default="/tmp/corpus-1gb", help="where the generated corpus is made (once)")
    g.add_argument("--corpus-gb", type=float, default=1.0, help="its size, from --data-root's documents repeated")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sections = args.only.split(",")
    if set(sections) - {"train", "decode", "draft-vocab", "verify", "tokenize", "corpus"}:
        raise SystemExit(f"--only {args.only}: sections are train, decode, draft-vocab, verify, tokenize, corpus")
    # defaults sized for the device: a 2-3 minute run on a laptop CPU, a model worth measuring on a GPU
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.compile = gpu if args.compile is None else args.compile
    args.preset = args.preset or ("360m" if gpu else "small")
    args.vocab_size = args.vocab_size or (49152 if gpu else 4096)
    args.batch_size = args.batch_size or (8 if gpu else 4)
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    transformers.logging.set_verbosity_error()  # its deprecation notes from inside assisted generation
    transformers.logging.disable_progress_bar()
    info = machine(device)
    header = (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
              f"GPU: {info['gpu'] or 'none'}; torch {info['torch']}, transformers {info['transformers']}, "
              f"tokenizers {info['tokenizers']}, tiktoken {info['tiktoken']}")
    print(header, flush=True)
    results, rows = dict(machine=info, args=vars(args)), []
    wall = {}
    for name in sections:
        t0 = time.perf_counter()
        if name == "train":
            results[name], new_rows = bench_train(args, device)
        elif name == "decode":
            results[name], new_rows = bench_decode(args, device)
        elif name == "verify":
            results[name], new_rows = bench_verify(args, device)
        elif name == "draft-vocab":
            results[name], new_rows = bench_draft_vocab(args, device)
        elif name == "corpus":
            results[name], new_rows = bench_corpus(args)
        else:
            results[name], new_rows = bench_tokenize(args)
        rows += new_rows
        wall[name] = time.perf_counter() - t0
    results["rows"], results["wall_s"] = rows, wall
    print(f"\n{header}\nwall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))
    print("\nratio = ours / theirs of the throughput: above 1, ours is faster\n")
    print("| what | ours | theirs | ratio | notes |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['what']} | {r['ours']:,.1f} | {r['theirs']:,.1f} | {r['ratio']:.2f}x | {r['notes']} |")
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
