"""
Domain-adaptive continual pretraining (DACP), as ixi-GEN does it: keep pretraining a model on its new domain's
corpus, mixed with general "pseudo-replay" text so it does not forget what it knew.

    python train.py --domain telco                              # one process
    torchrun --nproc_per_node=2 train.py --domain telco         # FSDP2 over 2 processes (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 train.py --domain telco --init-from /models/Qwen2.5-1.5B --lr 1e-5 --dtype bfloat16

This file holds the flags every training command shares, the optimizer and LR schedule, THE training loop
(`train_loop`: sft.py and distill.py hand it their own batches and loss), validation bits per byte, and the DACP
command. A run's folder (lock, checkpoints, export) is checkpoint.py's; processes and FSDP2 are parallel.py's.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import memory
from checkpoint import (checkpoint_dirs, export_hf, finish, first_eval, holds_run, is_complete, last_tokens,
                        prepare_out, record_run, resume, save_checkpoint, write_metrics)
from data import ReplayMixture, corpus_files, find_domains, read_documents
from model import IGNORE, PRESETS, Transformer, check_tokenizer, preset_model, to_dtype
from parallel import (PEAK_FLOPS, all_sum, by_gpu_name, check_batch_sizes, compute_dtype, launch, load_sharded, log,
                      micro_batches_of, rank_share, setup_distributed, shard_model, tokenize_once)
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# THE training loop


@dataclass
class Step:
    """One optimizer step's data for this process: its micro-batches; the number of trained (loss-bearing) tokens
    in the whole global batch, over all processes, that each micro-batch's summed loss is divided by; and the model
    FLOPs of the global batch as it was actually run (step_of), for MFU."""
    micro_batches: list
    n_trained: int
    flops: float


def step_of(batch, micro_batch_size, config):
    """The Step of a global batch [B, 2, T] of (ids, targets) rows: this process's micro-batches, the trained
    targets of the whole batch, and its FLOPs (padding included: it is computed)."""
    rows, width = batch.shape[0], batch.shape[-1]
    return Step(micro_batches_of(batch, micro_batch_size, dist.get_rank(), dist.get_world_size()),
                n_trained=int((batch[:, 1] != IGNORE).sum()), flops=config.flops_per_token(width) * rows * width)


def next_token_loss(model, batch):
    """Summed next-token cross-entropy of a [B, 2, T] batch of (ids, targets) rows over the trained targets (all of
    them in pretraining; the assistant's in SFT), a chunk of positions at a time (Transformer.loss)."""
    return model.loss(batch[:, 0], batch[:, 1])


def train_loop(model, optimizer, get_step, loss_fn, schedule, out, *, start_step=0, stop_step=None,
               evaluate_fn=None, device=torch.device("cpu")):
    """Run optimizer steps start_step .. stop_step - 1 (default: to the schedule's end; SFT stops at each curriculum
    stage's end, then continues from there). get_step(step) -> Step; loss_fn(model,
    micro_batch) -> summed loss over its trained tokens. The loss is normalised by the GLOBAL number of trained
    tokens (not per micro-batch, not per process), so the loss curve and the gradients are the same for any world
    size and any gradient accumulation (torchtitan). Appends a row per step to <out>/metrics.jsonl and returns the
    last evaluation (evaluate_fn() -> {name: value})."""
    rank = dist.get_rank()
    metrics_path = os.path.join(out, "metrics.jsonl")
    peak = by_gpu_name(PEAK_FLOPS, device)
    last_eval = evaluate_fn() if evaluate_fn and start_step == 0 else {}
    if last_eval:
        write_metrics(metrics_path, {"step": 0, **last_eval})
    last_ckpt = (checkpoint_dirs(out) or [None])[-1]
    tokens = last_tokens(metrics_path)  # trained tokens so far (resumed runs: up to their checkpoint)
    bar = tqdm(range(start_step, stop_step or schedule.max_steps), initial=start_step, total=schedule.max_steps,
               desc="train", disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        memory.reset_peak(device)

        # learning rate
        lr = schedule.lr_fn(step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward-backward, gradients accumulated over the micro-batches
        data = get_step(step)
        loss_sum = torch.zeros((), device=device)
        for i, micro in enumerate(data.micro_batches):
            model.set_requires_gradient_sync(i == len(data.micro_batches) - 1)  # reduce-scatter after the last
            loss = loss_fn(model, micro) / max(data.n_trained, 1)
            loss.backward()
            loss_sum += loss.detach()
        loss_value, = all_sum([loss_sum.item()], device)

        # clip and step, never on a diverged loss: the weights stay those of the last good step
        if not math.isfinite(loss_value):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise FloatingPointError(f"loss is {loss_value} at step {step + 1}: stopping; {where}")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # log
        tokens += data.n_trained
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "loss": round(loss_value, 6), "lr": lr, "grad_norm": round(grad_norm.item(), 4),
               "tokens": tokens, "tokens_per_s": round(data.n_trained / dt, 1),
               "peak_mb": memory.per_process(round(memory.peak_mb(device)))}  # each process's, in this step
        if peak:  # MFU (Chowdhery et al. 2022): achieved model FLOP/s over the peak of all devices
            row["mfu"] = round(data.flops / dt / (peak * dist.get_world_size()), 4)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")

        # evaluate
        if evaluate_fn and schedule.evaluates_after(step + 1):
            last_eval = evaluate_fn()
            row.update(last_eval)
        write_metrics(metrics_path, row)

        # checkpoint (the last step's state is the exported model instead)
        if schedule.save_every and (step + 1) % schedule.save_every == 0 and step + 1 < schedule.max_steps:
            last_ckpt = save_checkpoint(model, optimizer, out, step + 1, schedule.keep_checkpoints)
    bar.close()
    return last_eval


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(model, weight_decay, device):
    """AdamW; no weight decay on norms and biases (1-D tensors). The LR is set by train_loop at every step."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=device.type == "cuda")


def cosine_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps: the re-warm / re-decay that Ibrahim et al.
    2024 found right for continual pretraining."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Schedule:
    """What train_loop needs besides the model, the data and the loss: how many steps, the learning rate of each
    (lr_fn(step)), the gradient clip, and when to evaluate and checkpoint. Evaluation runs before the first step,
    every eval_every steps (0: never in between), after each step in eval_steps and after the last; checkpoints
    every save_every steps, keeping the newest keep_checkpoints."""
    max_steps: int
    lr_fn: Callable[[int], float]
    grad_clip: float
    eval_every: int = 0
    eval_steps: frozenset = frozenset()
    save_every: int = 0
    keep_checkpoints: int = 2

    def evaluates_after(self, step):
        return step == self.max_steps or step in self.eval_steps or bool(self.eval_every and
                                                                          step % self.eval_every == 0)


def cosine_schedule(args):
    """The Schedule of train.py's and distill.py's flags: warmup, then cosine to --min-lr at --max-steps."""
    def lr_fn(step):
        return cosine_lr(step, args.lr, args.min_lr, args.warmup_steps, args.max_steps)
    return Schedule(args.max_steps, lr_fn, args.grad_clip, args.eval_every, save_every=args.save_every,
                    keep_checkpoints=args.keep_checkpoints)


# -----------------------------------------------------------------------------
# Evaluation: validation loss (nats / token) and bits per byte


def bits_per_byte(nats, n_bytes):
    """Bits per byte = total nats / ln 2 / total UTF-8 bytes of the predicted text. Unlike loss per token it does
    not depend on the tokenizer (a tokenizer with longer tokens has fewer, harder ones), so models with different
    tokenizers compare fairly (used by nanochat, and the Pile paper, Gao et al. 2020)."""
    return nats / math.log(2) / n_bytes


def retention(before, after, lower_is_better):
    """General ability kept, as a fraction (1.0: nothing forgotten; SOAEsV2 reports 99.8 %): before / after for a
    loss such as bits per byte, after / before for a score such as MCQ accuracy."""
    return before / after if lower_is_better else after / before


@torch.no_grad()
def val_loss_and_bpb(model, val, seq_len, micro_batch_size, token_bytes, device, max_windows):
    """{"val/<name>": mean loss per token, "bpb/<name>": bits per byte} on each val stream's first max_windows
    windows of seq_len (a stream shorter than that: one window of all of it, never zero). Special tokens (zero
    bytes) are left out of bpb's nats and bytes alike. Windows are split across processes (rank_share); every
    process runs the same number of forward passes (FSDP needs all of them in each collective), padding with
    weight-0 rows. Also runs without a process group (eval.py)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    token_bytes = torch.as_tensor(token_bytes, device=device)
    results = {}
    for name, tokens in val.items():
        window = min(seq_len, len(tokens) - 1)  # a split shorter than one window is scored as one shorter window
        if window < 1:
            raise ValueError(f"the {name} val split has {len(tokens)} token(s): nothing to score")
        n = min((len(tokens) - 1) // window, max_windows)
        mine = rank_share(range(n), rank, world)
        n_batches = math.ceil(math.ceil(n / world) / micro_batch_size)
        sums = [0.0, 0.0, 0.0, 0.0]  # nats, tokens, nats on byte-bearing tokens, bytes
        for b in range(n_batches):
            idx = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
            weight = 1.0 if idx else 0.0
            rows = [tokens[i * window:i * window + window + 1] for i in (idx or [0])]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            x, y = batch[:, :-1], batch[:, 1:].flatten()
            nbytes = token_bytes[y]
            byte_nats = []

            def score(logits, rows):  # the nats of a chunk of positions, and those of its byte-bearing tokens
                nats = F.cross_entropy(logits.float(), y[rows], reduction="none")
                byte_nats.append(nats[nbytes[rows] > 0].sum().item())
                return nats.sum()
            sums[0] += weight * model.loss(x, batch[:, 1:], loss_fn=score).item()
            sums[1] += weight * y.numel()
            sums[2] += weight * sum(byte_nats)
            sums[3] += weight * nbytes.sum().item()
        nats, count, byte_nats, nbytes = all_sum(sums, device)
        results[f"val/{name}"] = nats / max(count, 1)
        results[f"bpb/{name}"] = bits_per_byte(byte_nats, max(nbytes, 1))
    return results


# -----------------------------------------------------------------------------
# Command line. Flags that make no sense are refused before any work, naming the flag (argparse's own message).


def number(kind, low=None, high=None, low_open=False):
    """An argparse type: a number of `kind` in [low, high] (low excluded with low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            where = f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else \
                f"{'>' if low_open else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value
    return parse


POSITIVE, COUNT = number(int, 1), number(int, 0)  # >= 1; >= 0


def parse_training_args(p, argv):
    """p's flags from argv. The cosine decays from --lr to --min-lr (by default a tenth of it): a floor below zero
    or above the peak would make no sense."""
    args = p.parse_args(argv)
    if "min_lr" in vars(args):
        args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
        if not 0 <= args.min_lr <= args.lr:
            p.error(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    return args


# The flags every training command shares (train.py, sft.py, distill.py), declared once: add_training_flags.
TRAINING_FLAGS = {
    "domain": dict(help="the domain corpus: data/<domain>/"),
    "data_root": dict(help="where the domains are"),
    "out": dict(help="output directory (default {out})"),
    "batch_size": dict(type=POSITIVE, help="global batch, in sequences"),
    "micro_batch_size": dict(type=POSITIVE, help="sequences per forward pass per process"),
    "seq_len": dict(type=POSITIVE, help="tokens per training sequence"),
    "max_steps": dict(type=POSITIVE, help="optimizer steps"),
    "lr": dict(type=number(float, 0, low_open=True), help="peak LR (ixi-GEN: 1e-5 on real checkpoints)"),
    "min_lr": dict(type=float, help="the cosine decays to this (default: --lr / 10)"),
    "warmup_steps": dict(type=COUNT, help="linear (re-)warming of the LR (Ibrahim et al. 2024)"),
    "weight_decay": dict(type=number(float, 0), help="AdamW's, on matrices only"),
    "grad_clip": dict(type=number(float, 0, low_open=True), help="gradient norm clip"),
    "seed": dict(type=int, help="data order and new weights"),
    "eval_every": dict(type=COUNT, help="steps between validation passes (0: at the start and end, stages' ends)"),
    "save_every": dict(type=COUNT, help="steps between resumable checkpoints (0: none)"),
    "keep_checkpoints": dict(type=COUNT, help="checkpoints kept (0: all)"),
    "resume": dict(action="store_true", help="continue the run in --out from its newest checkpoint"),
    "compile": dict(action="store_true", help="torch.compile each block"),
    "activation_checkpointing": dict(action="store_true", help="recompute activations in backward"),
    "dtype": dict(choices=["float32", "bfloat16"], help="compute dtype (default: bf16 on GPU, fp32 on CPU)"),
}


def add_training_flags(p, where, **defaults):
    """Add the TRAINING_FLAGS a command gives defaults for (a dict instead of a value replaces the flag's keywords:
    sft.py's per-stage --lr). where: the default --out, for its help."""
    for name, value in defaults.items():
        keywords = {**TRAINING_FLAGS[name], **(value if isinstance(value, dict) else {"default": value})}
        keywords["help"] = keywords["help"].format(out=where)
        p.add_argument("--" + name.replace("_", "-"), **keywords)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replay-domain", default="general", help="the general corpus replayed against forgetting")
    p.add_argument("--replay-ratio", type=number(float, 0, 1), default=0.5, help="fraction of each batch from the "
                   "replay domain (ixi-GEN chose 0.5; Ibrahim et al. 2024: 0.05 for a weak shift, 0.25 for a strong "
                   "one)")
    p.add_argument("--init-from", default="auto", help="an HF directory, a preset (" + ", ".join(PRESETS) +
                   ") to train from scratch, or auto: out/base, pretrained from scratch first if missing")
    p.add_argument("--tokenizer", default=None, help="with a preset --init-from: an HF directory whose tokenizer "
                   "to use (default: train one on the sample corpora)")
    p.add_argument("--vocab-size", type=number(int, 260), default=4096, help="size of a tokenizer trained from scratch")
    p.add_argument("--eval-windows", type=POSITIVE, default=64, help="at most this many val windows per domain")
    p.add_argument("--base-steps", type=POSITIVE, default=150, help="--init-from auto: steps to pretrain out/base")
    p.add_argument("--text-key", default="text", help="the key (column) of .jsonl / .parquet rows holding the text")
    add_training_flags(p, "out/<domain>", domain="telco", data_root="data", out=None, batch_size=16,
                       micro_batch_size=8, seq_len=256, max_steps=60, lr=3e-4, min_lr=None, warmup_steps=10,
                       weight_decay=0.1, grad_clip=1.0, seed=1337, eval_every=20, save_every=20, keep_checkpoints=2,
                       resume=False, compile=False, activation_checkpointing=False, dtype=None)
    return parse_training_args(p, argv)


# -----------------------------------------------------------------------------
# DACP: the command line


def load_init(args, device, dtype):
    """Tokenizer and the sharded fp32 model (FSDP2, computing in dtype) from --init-from: an HF directory, each
    process loading only its shards, or a new model of a preset shape."""
    if args.init_from in PRESETS:
        if args.tokenizer:
            tokenizer = Tokenizer.from_pretrained(args.tokenizer)
        else:
            domains = find_domains(args.data_root)
            log(f"training a {args.vocab_size}-token BPE tokenizer on the train corpora of {', '.join(domains)}")
            texts = (doc for d in domains for doc in read_documents(corpus_files(args.data_root, d, "train"),
                                                                    args.text_key))
            tokenizer = Tokenizer.train(list(texts), args.vocab_size)
        seq = max(PRESETS[args.init_from]["max_seq_len"], args.seq_len)
        model = preset_model(args.init_from, tokenizer.n_vocab, seq, tokenizer.bos_id, tokenizer.eos_id, args.seed)
        return shard_model(model, device, dtype, compile=args.compile), tokenizer
    if args.init_from.endswith(".gguf"):
        Transformer.from_pretrained(args.init_from)  # (its error says how to convert one)
    if not os.path.isdir(args.init_from):
        raise SystemExit(f"--init-from {args.init_from}: not a directory nor a preset ({', '.join(PRESETS)})")
    tokenizer = Tokenizer.from_pretrained(args.init_from)
    return load_sharded(args.init_from, device, dtype, compile=args.compile), tokenizer


def pretrain_base(args):
    """--init-from auto: out/base, a small model pretrained from scratch on the general corpus, first (or resumed,
    when an earlier attempt was interrupted) if it is not there yet."""
    base = os.path.join("out", "base")
    if is_complete(base):
        return base
    log(f"--init-from auto: {base} does not exist, so first pretraining a small base model from scratch on "
        f"data/{args.replay_domain} (as: train.py --domain {args.replay_domain} --replay-ratio 0 --init-from small "
        f"--out {base} --max-steps {args.base_steps} --lr 1e-3)")
    run(get_args(["--domain", args.replay_domain, "--replay-ratio", "0", "--init-from", "small", "--out", base,
                  "--max-steps", str(args.base_steps), "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "20",
                  "--eval-every", "0", "--data-root", args.data_root, "--seq-len", str(args.seq_len),
                  "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
                  "--seed", str(args.seed), "--vocab-size", str(args.vocab_size), "--text-key", args.text_key]
                 + (["--resume"] if holds_run(base) else [])))
    log(f"base model ready in {base}; now DACP on data/{args.domain}")
    return base


def run(args):
    rank, world, device = setup_distributed()
    check_batch_sizes(args, world)
    if args.init_from == "auto":
        args.init_from = pretrain_base(args)
    out = args.out or os.path.join("out", args.domain)
    prepare_out(out, args, {"init-from": args.init_from, "tokenizer": args.tokenizer}, free={"base_steps"})
    fresh = not checkpoint_dirs(out)

    dtype = compute_dtype(args.dtype, device)
    with memory.stage(out, "load", device):
        model, tokenizer = load_init(args, device, dtype)
    config = model.config
    check_tokenizer(tokenizer, config, args.init_from)
    if args.seq_len > config.max_seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's context ({config.max_seq_len} tokens)")
    export_dtype = to_dtype(config.dtype)  # the checkpoint's own (fp32 for a preset)
    model.activation_checkpointing = args.activation_checkpointing
    optimizer = make_optimizer(model, args.weight_decay, device)
    record_run(out, args)

    # Data: the domain and replay token streams (tokenised once, cached), and their val streams for evaluation.
    domains = [args.domain] + ([args.replay_domain] if args.replay_domain != args.domain else [])
    streams = {(d, split): tokenize_once(tokenizer, args.data_root, d, split, args.text_key)
               for split in ("train", "val") for d in domains}
    for d in dict.fromkeys([args.domain] * (args.replay_ratio < 1) + [args.replay_domain] * (args.replay_ratio > 0)):
        if len(streams[d, "train"]) <= args.seq_len:
            raise SystemExit(f"{os.path.join(args.data_root, d, 'train')}/: {len(streams[d, 'train'])} tokens, "
                             f"shorter than one training window of --seq-len {args.seq_len} + 1")
    mixture = ReplayMixture(streams[args.domain, "train"], streams.get((args.replay_domain, "train")),
                            args.seq_len, args.batch_size, args.replay_ratio, args.seed)
    val = {d: streams[d, "val"] for d in domains}
    token_bytes = tokenizer.token_byte_lengths()

    def get_step(step):  # windows of seq_len + 1 tokens: ids, and the same shifted by one as targets
        windows = torch.from_numpy(mixture.batch(step)).to(device)
        return step_of(torch.stack((windows[:, :-1], windows[:, 1:]), 1), args.micro_batch_size, config)

    def evaluate_fn():
        return val_loss_and_bpb(model, val, args.seq_len, args.micro_batch_size, token_bytes, device,
                                args.eval_windows)

    start_step = resume(model, optimizer, out) if args.resume else 0
    if fresh:
        replay = (f" with {args.replay_ratio:.0%} data/{args.replay_domain} replay"
                  if args.replay_ratio and args.replay_domain != args.domain else "")
        log(f"training {config.num_params() / 1e6:.1f}M parameters from {args.init_from}; {world} process(es) on "
            f"{device.type}; data/{args.domain}{replay}; {args.max_steps} steps of {args.batch_size} x "
            f"{args.seq_len} tokens")
    final = train_loop(model, optimizer, get_step, next_token_loss, cosine_schedule(args), out, start_step=start_step,
                       evaluate_fn=evaluate_fn, device=device)
    before = first_eval(out)
    with memory.stage(out, "export", device):
        export_hf(model, config, tokenizer, out, export_dtype)
    memory.record_run_peak(out, device)
    if rank == 0:
        print(summary_table(before, final, args.domain, args.replay_domain))
        print(memory.table(out))
    finish(out, **final)
    return final


def summary_table(before, after, domain, replay):
    """Domain and general bpb before and after, and general retention (bpb before / after: below 1, the general
    corpus got harder to predict)."""
    lines = ["", "| | before | after |", "| --- | --- | --- |"]
    for d in dict.fromkeys([domain, replay]):
        if f"bpb/{d}" in after:
            lines.append(f"| bpb/{d} | {before.get(f'bpb/{d}', float('nan')):.4f} | {after[f'bpb/{d}']:.4f} |")
    if f"bpb/{replay}" in after and replay != domain:
        kept = retention(before[f"bpb/{replay}"], after[f"bpb/{replay}"], lower_is_better=True)
        lines.append(f"| general retention | | {kept:.2%} |")
    return "\n".join(lines)


def main(argv=None):
    launch(run, get_args(argv))


if __name__ == "__main__":
    main()
