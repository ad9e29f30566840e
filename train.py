"""
Domain-adaptive continual pretraining (DACP), as ixi-GEN does it: keep pretraining a model on its new domain's
corpus, mixed with general "pseudo-replay" text so it does not forget what it knew.

    python train.py --domain telco                              # one process
    torchrun --nproc_per_node=2 train.py --domain telco         # FSDP2 over 2 processes (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 train.py --domain telco --init-from /models/Qwen2.5-1.5B --lr 1e-5 --dtype bfloat16

This file holds THE training loop (`train_loop`): sft.py and distill.py hand it their own batches and loss.
With --init-from auto (the default) it starts from out/base, pretraining that small base model from scratch on
the general corpus first if it does not exist yet.
"""

import argparse
import base64
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import memory
from data import ReplayMixture, corpus_files, find_domains, read_documents, tokenize_corpus
from files import fsync, lock_dir, read_json, write_atomic
from model import PRESETS, ModelConfig, Transformer, read_checkpoint, to_dtype, write_order, write_weights
from tokenizer import Tokenizer

# Peak dense bf16 tensor FLOP/s, for MFU (Chowdhery et al. 2022): achieved model FLOP/s over this.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def by_gpu_name(table, device):
    """The value of a {GPU name substring: value} table for this device; None on a CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in table.items() if k in name), None)


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


def check_lrs(p, args):
    """The cosine decays from --lr to --min-lr (by default a tenth of it): a floor below zero or above the peak
    would make no sense."""
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if not 0 <= args.min_lr <= args.lr:
        p.error(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="telco", help="the domain corpus: data/<domain>/")
    p.add_argument("--replay-domain", default="general", help="the general corpus replayed against forgetting")
    p.add_argument("--replay-ratio", type=number(float, 0, 1), default=0.5, help="fraction of each batch from the "
                   "replay domain (ixi-GEN chose 0.5; Ibrahim et al. 2024: 0.05 for a weak shift, 0.25 for a strong "
                   "one)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--init-from", default="auto", help="an HF directory, a preset (" + ", ".join(PRESETS) +
                   ") to train from scratch, or auto: out/base, pretrained from scratch first if missing")
    p.add_argument("--tokenizer", default=None, help="with a preset --init-from: an HF directory whose tokenizer "
                   "to use (default: train one on the sample corpora)")
    p.add_argument("--vocab-size", type=number(int, 260), default=4096, help="size of a tokenizer trained from scratch")
    p.add_argument("--out", default=None, help="output directory (default out/<domain>)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="global batch, in sequences")
    p.add_argument("--micro-batch-size", type=POSITIVE, default=8, help="sequences per forward pass per process")
    p.add_argument("--seq-len", type=POSITIVE, default=256)
    p.add_argument("--max-steps", type=POSITIVE, default=60)
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=3e-4,
                   help="peak LR (real checkpoints: ixi-GEN used 1e-5)")
    p.add_argument("--min-lr", type=float, default=None, help="the cosine decays to this (default: --lr / 10)")
    p.add_argument("--warmup-steps", type=COUNT, default=10, help="linear re-warming (Ibrahim et al. 2024)")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.1)
    p.add_argument("--grad-clip", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=COUNT, default=20, help="steps between validation passes (0: only at the "
                   "start and the end)")
    p.add_argument("--eval-windows", type=POSITIVE, default=64, help="at most this many val windows per domain")
    p.add_argument("--save-every", type=COUNT, default=20, help="steps between resumable checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=COUNT, default=2, help="checkpoints kept (0: all)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU); weights stay fp32")
    p.add_argument("--base-steps", type=POSITIVE, default=150, help="--init-from auto: steps to pretrain out/base")
    args = p.parse_args(argv)
    check_lrs(p, args)
    return args


# -----------------------------------------------------------------------------
# Processes


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; plain `python train.py` is a group of one. One code path."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if int(os.environ["WORLD_SIZE"]) > 1:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def log(*args):
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def rank_share(items, rank, world):
    """This process's share of a list: contiguous blocks of ceil(n / world) items, in rank order (the last ones may
    be shorter or empty), so gathering the shares in rank order gives back the list. The one way work is split
    across processes: batches, val windows, prompts to sample."""
    per_rank = -(-len(items) // world)
    return items[rank * per_rank:(rank + 1) * per_rank]


def gather(items):
    """Every process's list, concatenated in rank order, on every process (the inverse of rank_share)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def all_sum(values, device):
    """Sum a list of floats over processes (a no-op in one process without a process group, as in eval.py)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# Model and optimizer


def shard_model(model, device, dtype, compile=False):
    """FSDP2 (torchtitan's recipe): fully_shard each block, then the root, so each block's parameters are gathered
    just before it runs and freed after. Weights stay fp32; with bf16 the forward/backward runs in bf16 and
    gradients are reduced in fp32. Gradients are SUMMED over processes (divide factor 1): the loss is already
    normalised by the global number of trained tokens, so averaging would divide twice (and over gloo FSDP2 has been
    reported to sum anyway, pytorch issue 162338: summing on purpose makes both backends agree)."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else \
        MixedPrecisionPolicy()
    if not model.lm_head.weight.is_meta:  # (a model on the meta device is materialised after sharding)
        model.to(device)
    for block in model.model.layers:
        if compile:
            block.compile()
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def load_sharded(path, device, dtype, compile=False):
    """An HF checkpoint as a sharded FSDP2 model of fp32 weights, each process reading only its own shards: the
    model is built on the meta device (no memory), sharded, given storage for this process's shards alone, and
    filled from the safetensors files slice by slice (Transformer.load_rows). Memory per process while loading:
    its 1 / world of the model plus one slice, never the whole model (torchtitan loads the same way). The config's
    dtype stays the one the checkpoint is stored in, which the export writes back."""
    config, _ = read_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(config)
    model = shard_model(model, device, dtype, compile=compile)
    model.to_empty(device=device)
    model.load_rows(path, owned_rows)
    return model


def owned_rows(p):
    """The part of parameter p this process holds, and its first row in the full tensor: FSDP2 shards dim 0 into
    chunks of ceil(rows / world), in rank order (torch.chunk's split); a tensor split by rows outside FSDP (a
    sharded teacher's vocabulary) says where its rows start; anything else is whole."""
    if isinstance(p, DTensor):
        return p.to_local(), dist.get_rank() * -(-p.shape[0] // dist.get_world_size())
    return p.data, getattr(p, "first_row", 0)


def compute_dtype(name, device):
    """--dtype, by default bf16 on GPU and fp32 on CPU (where bf16 matmuls are slow)."""
    return to_dtype(name or ("bfloat16" if device.type == "cuda" else "float32"))


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


def preset_model(preset, vocab_size, max_seq_len, bos_token_id, eos_token_id, seed):
    """A new model of a preset shape (model.PRESETS), randomly initialised from `seed`: a from-scratch base
    (train.py) or a new draft (distill.py)."""
    config = ModelConfig.from_preset(preset, vocab_size=vocab_size, max_seq_len=max_seq_len,
                                     bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights()
    return model


# -----------------------------------------------------------------------------
# Checkpoints: resumable state under <out>/checkpoints/step_NNNNNN/, and the HF directory <out>/ at the end.
#
# A checkpoint is safetensors and JSON only, so resuming never unpickles anything (a pickle can run code): the model
# and optimizer shards through torch.distributed.checkpoint's safetensors storage (each process writes its own
# shards with their offsets in the file header; any number of processes can read them back), and each process's
# step and RNG state as JSON. The run's settings are in <out>/run.json.


def checkpoint_dirs(out):
    """Complete checkpoints, oldest first. A directory still named *.tmp was interrupted mid-write: ignored."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit())


def checkpoint_state(model, optimizer):
    """The model and optimizer state as one flat {name: tensor} dict (DTensor shards), as safetensors stores it,
    and the optimizer's state dict it came from. A tied lm_head is the embedding: stored once."""
    state = {f"model.{k}": v for k, v in get_model_state_dict(model).items()
             if not (k == "lm_head.weight" and model.config.tie_embeddings)}
    optim = get_optimizer_state_dict(model, optimizer)  # (fills Adam's moments with zeros before the first step)
    for fqn, tensors in optim["state"].items():
        for name, v in tensors.items():
            state[f"optim.{fqn}.{name}"] = v
    return state, optim


def save_checkpoint(model, optimizer, out, step, keep):
    """Each process writes its shards into step_N.tmp; once all are written, rank 0 fsyncs them and renames the
    folder to step_N, so a SIGKILL or a power loss at any moment leaves the previous checkpoint intact. Older
    checkpoints beyond `keep` are pruned (0 keeps all)."""
    path = os.path.join(out, "checkpoints", f"step_{step:06d}")
    tmp = path + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state, _ = checkpoint_state(model, optimizer)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(tmp, save_distributed=True))
    write_atomic(os.path.join(tmp, f"trainer-{dist.get_rank()}.json"), json.dumps(
        {"step": step, "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}))
    dist.barrier()  # every process's files are complete: now no one writes in tmp while rank 0 lists it
    if dist.get_rank() == 0:
        for name in os.listdir(tmp):  # the shards reach the disk before the checkpoint is renamed
            fsync(os.path.join(tmp, name))
        fsync(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(path))
        for old in checkpoint_dirs(out)[:-keep] if keep else []:
            shutil.rmtree(old)
    dist.barrier()
    return path


def resume(model, optimizer, out):
    """Continue the run in <out> from its newest checkpoint; metrics rows written after it are dropped (they are
    about to be redone). A run stopped before its first checkpoint starts again from step 0. Returns the step to
    start from."""
    if not checkpoint_dirs(out):
        truncate_metrics(os.path.join(out, "metrics.jsonl"), -1)
        log(f"{out} has no checkpoint yet: starting again from step 0")
        return 0
    path = checkpoint_dirs(out)[-1]
    step = load_checkpoint(model, optimizer, path)
    truncate_metrics(os.path.join(out, "metrics.jsonl"), step)
    log(f"resumed from {path} at step {step}")
    return step


def load_checkpoint(model, optimizer, path):
    state, optim = checkpoint_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(path))
    except Exception as e:  # a checkpoint from an older version, or damaged files
        raise ValueError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if model.config.tie_embeddings:
        model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
    for fqn, tensors in optim["state"].items():
        for name in tensors:
            tensors[name] = state[f"optim.{fqn}.{name}"]
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optim)
    mine = os.path.join(path, f"trainer-{dist.get_rank()}.json")
    if not os.path.exists(mine):  # resumed with more processes than saved: they start from rank 0's RNG
        mine = os.path.join(path, "trainer-0.json")
    trainer = read_json(mine)
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(trainer["rng"])), dtype=torch.uint8))
    return trainer["step"]


def export_hf(model, config, tokenizer, out, dtype):
    """Write <out> as an HF directory: weights (in dtype) and config, every tokenizer file (chat template included)
    and generation_config.json, so transformers, vLLM and lm-eval-harness load it as they load the checkpoint it
    came from. The weights stream out one tensor at a time: every process takes part in gathering each one, rank 0
    writes it into its file and lets it go, so the export needs one tensor more than training, not the whole model
    (twice) on rank 0. The files are those Transformer.save_pretrained writes, byte for byte."""
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_embeddings)}
    specs = {k: (tuple(v.shape), dtype) for k, v in state.items()}
    tensors = (full_tensor(state[k]).to(dtype) for k in write_order(specs, MAX_SHARD_SIZE))
    if dist.get_rank() == 0:
        write_weights(out, replace(config, dtype=str(dtype).removeprefix("torch.")), specs, tensors, MAX_SHARD_SIZE)
        tokenizer.save_pretrained(out)
        write_generation_config(out, config, tokenizer.source)
    else:
        for _ in tensors:  # the same gathers, in the same order, as rank 0's
            pass
    dist.barrier()


MAX_SHARD_SIZE = 5 * 2**30  # bytes per safetensors file of an export, as transformers' save_pretrained


def full_tensor(t):
    """A parameter's whole value from its FSDP2 shards (a collective: every process must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def write_generation_config(out, config, source):
    """The source checkpoint's generation defaults (sampling settings and all), with this model's bos and eos ids
    (SFT adds the end-of-turn token to them)."""
    generation = read_json(os.path.join(source, "generation_config.json"), {}) if source else {}
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(config, key) is not None:
            generation[key] = getattr(config, key)
    write_atomic(os.path.join(out, "generation_config.json"), json.dumps(generation, indent=2) + "\n")


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
            sums[0] += weight * model(x, loss_fn=score).item()
            sums[1] += weight * y.numel()
            sums[2] += weight * sum(byte_nats)
            sums[3] += weight * nbytes.sum().item()
        nats, count, byte_nats, nbytes = all_sum(sums, device)
        results[f"val/{name}"] = nats / max(count, 1)
        results[f"bpb/{name}"] = bits_per_byte(byte_nats, max(nbytes, 1))
    return results


# -----------------------------------------------------------------------------
# THE training loop


@dataclass
class Step:
    """One optimizer step's data for this process: its micro-batches; the number of trained (loss-bearing) tokens
    in the whole global batch, over all processes, that each micro-batch's summed loss is divided by; and the model
    FLOPs of the global batch as it was actually run (batch_flops), for MFU."""
    micro_batches: list
    n_trained: int
    flops: float


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
    """The Schedule of a run with train.py's flags: --lr warmed up over --warmup-steps and decayed to --min-lr at
    --max-steps, with its clip, eval and save cadence (train.py and distill.py; sft.py has one per stage)."""
    return Schedule(args.max_steps, lambda step: cosine_lr(step, args.lr, args.min_lr, args.warmup_steps,
                                                           args.max_steps),
                    args.grad_clip, args.eval_every, save_every=args.save_every,
                    keep_checkpoints=args.keep_checkpoints)


def batch_flops(config, rows, width):
    """Model FLOPs of a training step on `rows` sequences of `width` positions (padding included: it is computed)."""
    return config.flops_per_token(width) * rows * width


def causal_lm_loss(model, batch):
    """Summed next-token cross-entropy of a [B, T + 1] token batch (pretraining: every target is trained),
    computed a chunk of positions at a time (model.ChunkedLoss): the batch's logits never exist at once."""
    x, y = batch[:, :-1], batch[:, 1:].flatten()
    return model(x, loss_fn=lambda logits, rows: F.cross_entropy(logits.float(), y[rows], reduction="sum"))


def train_loop(model, optimizer, get_step, loss_fn, schedule, out, *, start_step=0, evaluate_fn=None,
               device=torch.device("cpu")):
    """Run optimizer steps start_step .. schedule.max_steps - 1. get_step(step) -> Step; loss_fn(model,
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
    bar = tqdm(range(start_step, schedule.max_steps), initial=start_step, total=schedule.max_steps, desc="train",
               disable=rank != 0, dynamic_ncols=True)
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


def write_metrics(path, row):
    if dist.get_rank() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path):
    """The rows of a metrics.jsonl, oldest first (none for a run not started yet). A half-written last line (the
    run was killed while writing it) is left out; a bad line before it is an error naming file and line."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) or line.endswith("\n"):
                raise ValueError(f"{path}:{n}: not a JSON row (the file is damaged)") from None
    return rows


def last_tokens(path):
    """The "tokens" of the last metrics row (0 for a new run)."""
    return next((r["tokens"] for r in reversed(read_metrics(path)) if "tokens" in r), 0)


def truncate_metrics(path, step):
    """On resume, drop rows an interrupted run wrote after its checkpoint: they are about to be redone."""
    if dist.get_rank() == 0 and os.path.exists(path):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step))
    dist.barrier()


def on_rank0(fn):
    """fn() on rank 0 while the other processes wait; returns its result on rank 0 (None elsewhere). A user error
    there stops every process with rank 0's message, instead of leaving the others waiting forever at their next
    collective."""
    error = result = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except SystemExit as e:
            error = str(e.code)
        except (ValueError, FileNotFoundError) as e:
            error = f"error: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SystemExit(box[0] if dist.get_rank() == 0 else 1)
    return result


def tokenize_once(tokenizer, data_root, domain, split):
    """The token stream of data/<domain>/<split>: rank 0 tokenises it (or finds it cached) while the others wait,
    then every process reads the cache. (Two separate runs tokenising one corpus at once are safe too: each
    writes its own temporary file and renames it into place.)"""
    tokens = on_rank0(lambda: tokenize_corpus(tokenizer, data_root, domain, split))
    if tokens is None:  # the other processes, once rank 0 has written the cache
        tokens = tokenize_corpus(tokenizer, data_root, domain, split)
    bos, eos = tokenizer.document_ids()
    framing = " ".join(repr(tokenizer.decode([i])) for i in (bos, eos) if i is not None)
    log(f"{os.path.join(data_root, domain, split)}/: {len(corpus_files(data_root, domain, split))} files, "
        f"{len(tokens):,} tokens (documents framed by {framing})")
    return tokens


# Settings that change nothing a run learns: a --resume may change them (and the number of processes).
FREE_ON_RESUME = {"resume", "eval_every", "eval_windows", "save_every", "keep_checkpoints", "compile",
                  "activation_checkpointing", "micro_batch_size", "accept_prompts", "base_steps", "replicate_teacher"}
LOCKS = []  # the lock files of the output directories this process holds (open until it exits)


def prepare_out(out, args, inputs):
    """Claim --out for this run before any work (on rank 0): refuse an --out that is one of the input directories
    (inputs: {flag: path}) or inside one; hold the lock on it; refuse one that holds another run unless --resume,
    and a --resume whose settings differ from the run's own (<out>/run.json) in anything that decides what is
    learned. A new run writes its settings to run.json."""
    def claim():
        for flag, path in inputs.items():
            if path and os.path.isdir(path) and inside(out, path):
                how = "the same directory as" if os.path.realpath(out) == os.path.realpath(path) else "inside"
                raise SystemExit(f"--out {out} is {how} --{flag} {path}: the run would overwrite its own input; "
                                 "choose another --out")
        lock, previous = lock_dir(out)
        LOCKS.append(lock)
        if previous:
            log(f"{out}: taking over the lock left by a run that ended without releasing it ({previous})")
        settings_file = os.path.join(out, "run.json")
        if args.resume and not holds_run(out):
            raise SystemExit(f"--resume: {out} holds no run to resume")
        if holds_run(out) and not args.resume:
            raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        settings = {k: v for k, v in vars(args).items() if k != "resume"}
        if not args.resume:
            write_atomic(settings_file, json.dumps(settings, indent=1) + "\n")
        elif os.path.exists(settings_file):
            saved = read_json(settings_file)
            changed = [k for k in dict.fromkeys([*saved, *settings])
                       if k not in FREE_ON_RESUME and saved.get(k) != settings.get(k)]
            if changed:
                raise SystemExit(f"--resume: {out} was started with other settings: " + ", ".join(
                    f"--{k.replace('_', '-')} {saved.get(k)} (now {settings.get(k)})" for k in changed) +
                    "; resume with the run's own settings, or start a new run in another --out")
    on_rank0(claim)


def holds_run(out):
    """Whether a run was started in out (finished or not): it has its settings, metrics or checkpoints."""
    return any(os.path.exists(os.path.join(out, name)) for name in ("run.json", "metrics.jsonl")) \
        or bool(checkpoint_dirs(out))


def inside(path, folder):
    """Whether path is folder or lies inside it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def micro_batches_of(batch, micro_batch_size, rank, world):
    """This process's micro-batches out of the global batch (its rank_share of the rows)."""
    mine = rank_share(batch, rank, world)
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def check_batch_sizes(args, world):
    if args.batch_size % (args.micro_batch_size * world):
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} processes")


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
            texts = (doc for d in domains for doc in read_documents(corpus_files(args.data_root, d, "train")))
            tokenizer = Tokenizer.train(list(texts), args.vocab_size)
        model = preset_model(args.init_from, tokenizer.n_vocab, max(PRESETS[args.init_from]["max_seq_len"],
                                                                    args.seq_len),
                             tokenizer.bos_id, tokenizer.eos_id, args.seed)
        return shard_model(model, device, dtype, compile=args.compile), tokenizer
    if args.init_from.endswith(".gguf"):
        Transformer.from_pretrained(args.init_from)  # (its error says how to convert one)
    if not os.path.isdir(args.init_from):
        raise SystemExit(f"--init-from {args.init_from}: not a directory nor a preset ({', '.join(PRESETS)})")
    tokenizer = Tokenizer.from_pretrained(args.init_from)
    return load_sharded(args.init_from, device, dtype, compile=args.compile), tokenizer


def run(args):
    rank, world, device = setup_distributed()
    check_batch_sizes(args, world)
    if args.init_from == "auto":
        args.init_from = os.path.join("out", "base")
        if not os.path.exists(os.path.join(args.init_from, "config.json")):
            log(f"--init-from auto: {args.init_from} does not exist, so first pretraining a small base model from "
                f"scratch on data/{args.replay_domain} (as: train.py --domain {args.replay_domain} --replay-ratio 0 "
                f"--init-from small --out {args.init_from} --max-steps {args.base_steps} --lr 1e-3)")
            base = get_args(["--domain", args.replay_domain, "--replay-ratio", "0", "--init-from", "small",
                             "--out", args.init_from, "--max-steps", str(args.base_steps), "--lr", "1e-3",
                             "--min-lr", "1e-4", "--warmup-steps", "20", "--eval-every", "0",
                             "--data-root", args.data_root, "--seq-len", str(args.seq_len),
                             "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
                             "--seed", str(args.seed), "--vocab-size", str(args.vocab_size)]
                            + (["--resume"] if holds_run(args.init_from) else []))
            run(base)
            log(f"base model ready in {args.init_from}; now DACP on data/{args.domain}")
    out = args.out or os.path.join("out", args.domain)
    prepare_out(out, args, {"init-from": args.init_from, "tokenizer": args.tokenizer})
    fresh = not checkpoint_dirs(out)

    dtype = compute_dtype(args.dtype, device)
    with memory.stage(out, "load", device):
        model, tokenizer = load_init(args, device, dtype)
    config = model.config
    if tokenizer.n_vocab > config.vocab_size:
        raise SystemExit(f"the tokenizer of {args.init_from} has {tokenizer.n_vocab} tokens but the model's "
                         f"vocab_size is {config.vocab_size}")
    if args.seq_len > config.max_seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's context ({config.max_seq_len} tokens)")
    export_dtype = to_dtype(config.dtype)  # the checkpoint's own (fp32 for a preset)
    model.activation_checkpointing = args.activation_checkpointing
    optimizer = make_optimizer(model, args.weight_decay, device)

    # Data: the domain and replay token streams (tokenised once, cached), and their val streams for evaluation.
    domains = [args.domain] + ([args.replay_domain] if args.replay_domain != args.domain else [])
    streams = {(d, split): tokenize_once(tokenizer, args.data_root, d, split) for split in ("train", "val")
               for d in domains}
    for d in dict.fromkeys([args.domain] * (args.replay_ratio < 1) + [args.replay_domain] * (args.replay_ratio > 0)):
        if len(streams[d, "train"]) <= args.seq_len:
            raise SystemExit(f"{os.path.join(args.data_root, d, 'train')}/: {len(streams[d, 'train'])} tokens, "
                             f"shorter than one training window of --seq-len {args.seq_len} + 1")
    mixture = ReplayMixture(streams[args.domain, "train"], streams.get((args.replay_domain, "train")),
                            args.seq_len, args.batch_size, args.replay_ratio, args.seed)
    val = {d: streams[d, "val"] for d in domains}
    token_bytes = tokenizer.token_byte_lengths()

    def get_step(step):
        batch = torch.from_numpy(mixture.batch(step)).to(device)
        return Step(micro_batches_of(batch, args.micro_batch_size, rank, world),
                    n_trained=args.batch_size * args.seq_len, flops=batch_flops(config, args.batch_size, args.seq_len))

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
    final = train_loop(model, optimizer, get_step, causal_lm_loss, cosine_schedule(args), out, start_step=start_step,
                       evaluate_fn=evaluate_fn, device=device)
    before = first_eval(out)
    with memory.stage(out, "export", device):
        export_hf(model, config, tokenizer, out, export_dtype)
    if rank == 0:
        print(summary_table(before, final, args.domain, args.replay_domain))
        print(memory.table(out))
    return final


def first_eval(out):
    """The evaluation before training: metrics.jsonl's first row (step 0)."""
    if dist.get_rank() != 0:
        return {}
    return read_metrics(os.path.join(out, "metrics.jsonl"))[0]


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


def launch(run, args):
    """Run a training command (train.py, sft.py, distill.py) and leave the process group cleanly: after a
    successful run every process waits for the others before the group is destroyed (one process tearing its
    gloo connections down while another still holds them has aborted the latter at exit)."""
    try:
        result = run(args)
        if dist.is_initialized():
            dist.barrier()
        return result
    except FloatingPointError as e:  # a diverged run: say which step and which checkpoint is good, no traceback
        raise SystemExit(str(e)) from None
    except (ValueError, FileNotFoundError, KeyError) as e:  # a user's file or flag, named in the message
        message = e.args[0] if isinstance(e, KeyError) else str(e)
        raise SystemExit(f"error: {message}" if not dist.is_initialized() or dist.get_rank() == 0 else 1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    launch(run, get_args(argv))


if __name__ == "__main__":
    main()
