"""
Memory per process: measured while the stages run, and planned before they do.

Measured: the peak of each process in each stage (max RSS on CPU, max allocated on GPU), reset at the stage's start.
train_loop puts each training step's peak in its metrics row; loading, export and the other stages are recorded by
`stage()` in <out>/memory.json, with each process's peak over the whole run, and every run ends with a table of them.

Planned: the model is built on the meta device (no memory) and the bytes each process holds at each stage's peak are
added up from its shapes, for a world size, micro-batch, sequence length and dtype:

    python memory.py plan Qwen2.5-0.5B Qwen2.5-7B --world 8 --micro-batch-size 4 --seq-len 2048
    python memory.py plan out/telco-draft --world 2 --micro-batch-size 1 --seq-len 256 --teacher out/telco-sft
    python memory.py measure            # 1 and 2 processes on a random 315M, 152k-vocabulary checkpoint (CPU)
    python memory.py measure-teacher    # the whole run of a distillation whose 0.72B teacher decodes (CPU)

The plan counts tensors only; a CPU process also holds its own code and libraries (the "baseline" of the measured
table, a few hundred MB), which is why the measured column subtracts it.
"""
import argparse
import ctypes
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import read_metrics
from data import corpus_files, read_documents
from files import read_json, write_atomic
from model import PRESETS, ModelConfig, Transformer, loss_chunk_rows, read_checkpoint, to_dtype
from parallel import gather, tensor_parallel
from tokenizer import Tokenizer

MB = 2**20
WHOLE_RUN = "whole run"  # memory.json's entry for each process's peak over the whole command


# -----------------------------------------------------------------------------
# Measured


# The peak of everything before the last reset_peak: resetting the counter for a stage must not lose the whole
# run's peak, which is what the machine has to find (memory.json's "whole run").
_before_reset_mb = 0.0


def reset_peak(device, trim=False):
    """Start a new peak: the GPU allocator's counter, or on Linux the kernel's high-water mark of the resident set
    (writing 5 to /proc/self/clear_refs sets it to the current RSS). Elsewhere the peak is the process's since it
    started. trim (a stage's start, not every step: the pages handed back would be faulted in again): first give
    the heap glibc keeps after frees back to the system, so the stage's peak starts from what is live. The peak so
    far is kept for run_peak_mb first."""
    global _before_reset_mb
    _before_reset_mb = max(_before_reset_mb, peak_mb(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        if trim:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_mb(device):
    """This process's peak memory since reset_peak, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    if os.path.exists("/proc/self/status"):
        return _status("VmHWM") / MB
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KB elsewhere
    return maxrss / (MB if sys.platform == "darwin" else 1024)


def run_peak_mb(device):
    """This process's peak memory since it started, in MB, across every reset_peak (the high-water mark is
    monotone between resets, so the whole run's peak is the largest of the pieces')."""
    return max(_before_reset_mb, peak_mb(device))


def current_mb(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MB
    if os.path.exists("/proc/self/status"):
        return _status("VmRSS") / MB
    return peak_mb(device)


def per_process(value):
    """[value of rank 0, rank 1, ...] on every process."""
    return gather([value])


def step_peaks(out):
    """Each process's highest `peak_mb` over the training steps of <out>/metrics.jsonl ([] before any step). A run
    resumed on another number of processes: over the steps of the last one."""
    steps = [r["peak_mb"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "peak_mb" in r]
    steps = [s for s in steps if len(s) == len(steps[-1])] if steps else []
    return [max(s[r] for s in steps) for r in range(len(steps[0]))] if steps else []


@contextmanager
def stage(out, name, device):
    """Record the peak memory of each process over the with-block as <out>/memory.json's entry `name`:
    {"peak_mb": [per process], "start_mb": [per process, at the block's start]}."""
    reset_peak(device, trim=True)
    start = current_mb(device)
    yield
    record(out, name, {"peak_mb": [round(v) for v in per_process(peak_mb(device))],
                       "start_mb": [round(v) for v in per_process(start)]})


def record(out, name, entry):
    """memory.json's entry `name` := entry (rank 0 writes; the file is replaced atomically)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = os.path.join(out, "memory.json")
        stages = read_json(path) if os.path.exists(path) else {}
        stages[name] = entry
        write_atomic(path, json.dumps(stages, indent=1) + "\n")


def record_run_peak(out, device):
    """memory.json's "whole run": each process's peak from its start until now (a collective: every process calls
    it). A resumed run's is the peak of the run that resumed."""
    record(out, WHOLE_RUN, {"peak_mb": [round(v) for v in per_process(run_peak_mb(device))]})


def table(out):
    """The end-of-run line: peak MB per process at each recorded stage, in the training steps and over the whole
    run."""
    path = os.path.join(out, "memory.json")
    stages = read_json(path) if os.path.exists(path) else {}
    peaks = step_peaks(out)
    if peaks:
        stages["train step"] = {"peak_mb": peaks}
    if WHOLE_RUN in stages:  # (last)
        stages[WHOLE_RUN] = stages.pop(WHOLE_RUN)
    cells = [f"{name} {' / '.join(str(v) for v in e['peak_mb'])}" for name, e in stages.items()]
    return "peak memory per process (MB): " + "; ".join(cells) if cells else ""


# -----------------------------------------------------------------------------
# Planned


# Public configurations (their config.json's numbers) of the sizes the README plans for
PUBLIC = {
    "Qwen2.5-0.5B": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864, vocab_size=151936,
                         tie_embeddings=True),
    "Qwen2.5-1.5B": dict(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960, vocab_size=151936,
                         tie_embeddings=True),
    "Qwen2.5-7B": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944, vocab_size=152064,
                       tie_embeddings=False),
    "Qwen2.5-72B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=29568, vocab_size=152064,
                        tie_embeddings=False),
}


def model_config(name):
    """A ModelConfig from an HF directory, a preset or a PUBLIC name."""
    if name in PUBLIC:
        return ModelConfig(model_type="qwen2", qkv_bias=True, max_seq_len=32768, dtype="bfloat16", **PUBLIC[name])
    if name in PRESETS:
        return ModelConfig.from_preset(name)
    return read_checkpoint(name)[0]


def shapes(config):
    """{name: shape} of the model's parameters (a tied lm_head once), from the meta device."""
    with torch.device("meta"):
        model = Transformer(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def activation_bytes(config, tokens, size, checkpointing=False, seq_len=0):
    """Bytes autograd keeps for backward in one forward pass over `tokens` positions, counted from what model.py's
    ops save (tests/test_memory.py checks this against the tensors autograd really saves): per block the inputs of
    the norms, their normalised outputs and 1/rms (and a pre-norm's output, the next matmul's input; without
    pre-norms that input is the residual stream itself), q and k after RoPE, v, attention's output and
    log-sum-exp, and the gated MLP's four hidden-size tensors; then the final norm's. With activation checkpointing
    each block keeps its input only, and one block's worth lives while it is recomputed. Per sequence rather than
    per token: SDPA keeps a sliding-window layer's mask as a [seq_len, seq_len] tensor of the compute dtype; per
    model: Gemma-3's (1 + w) of each norm, in fp32, and its embedding scale."""
    d, q, kv, h = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    n_norms = 2 * (config.pre_norms + config.post_norms)
    norms = (6 * d if config.pre_norms else 2 * d) + (4 * d if config.post_norms else 0)
    per_block = (norms + 2 * q + 2 * kv + 4 * h) * size + (n_norms + config.n_heads) * 4  # 1/rms and lse in fp32
    if config.qk_norm:
        per_block += (2 * q + 2 * kv) * size + (config.n_heads + config.n_kv_heads) * 4
    head = (2 * d) * size + 4 + 8  # the final norm's input and output, 1/rms, and the int64 token id
    sliding = sum(config.window(i) is not None for i in range(config.n_layers))
    fixed = (size if config.embed_scale else 0) + seq_len ** 2 * size * (min(sliding, 1) if checkpointing else sliding)
    if config.norm_offset:
        fixed += 4 * (config.n_layers * (n_norms * d + 2 * config.head_dim * config.qk_norm) + d)
    if checkpointing:
        return tokens * (config.n_layers * d * size + per_block + head) + fixed
    return tokens * (config.n_layers * per_block + head) + fixed


def plan(config, world, micro_batch_size, seq_len, dtype, teacher=None, checkpointing=False, device="cuda",
         export_dtype=None):
    """Planned peak bytes per process of each stage: {stage: (bytes, what they are)}, from the shapes alone.

    The weights are fp32 shards (FSDP2: 1 / world of every tensor). A training step peaks at one of three moments:
    as backward starts (weights and AdamW's moments, the gathered root (embedding, head: in one process only) and
    two blocks in the compute dtype, every block's activations, and ChunkedLoss's gradients of h and W, in fp32), as
    it ends (all the sharded gradients, and the root's whole gradient beside the embedding's dense one or beside the
    reduce-scatter's input copy, and its output; on CPU also the activations' freed heap), or in the optimizer
    step (weights, gradients and both moments; on CPU AdamW's one-tensor-at-a-time loop adds two temporaries of a
    tensor's shard). Distillation adds the teacher's shards (and, FSDP2's, two gathered blocks) and its hidden
    states, and its loss chunk holds about ten [positions, vocabulary] tensors. The export adds
    one gathered tensor (and its copy in the export dtype) to what training holds."""
    size = dtype.itemsize
    params = shapes(config)
    n = sum(math.prod(s) for s in params.values())
    largest = max(math.prod(s) for s in params.values())
    root = sum(math.prod(s) for k, s in params.items() if not k.startswith("model.layers."))
    block = sum(math.prod(s) for k, s in params.items() if k.startswith("model.layers.0."))
    tokens = micro_batch_size * seq_len
    V, d = config.vocab_size, config.dim
    rows = min(tokens, loss_chunk_rows(V))
    adam_temporaries = 0 if device == "cuda" else 2 * largest / world * 4  # (fused AdamW on GPU)
    # On CPU the activations' memory, freed during backward in pieces smaller than glibc's mmap threshold, stays
    # in the heap (and in the RSS) until trimmed; a GPU's max_memory_allocated counts live tensors only.
    activations = activation_bytes(config, tokens, size, checkpointing, seq_len)
    retained = 0 if device == "cuda" else activations
    # Gemma's final_logit_softcapping: the chunk's logits divided, their tanh (kept for backward) and the product
    capped = 2 * size if config.logit_softcap is not None else 0

    # With several processes the embedding and the head are split by vocabulary (parallel.vocab_parallel): never
    # gathered, each process's gradient of its rows (the head's and the lookups') is 1 / world of the table's, and
    # a loss chunk's logits and gradient are also exchanged (all-to-all): about four more of its tensors.
    table = sum(math.prod(s) for k, s in params.items() if k in ("model.embed_tokens.weight", "lm_head.weight"))
    split = world > 1
    gathered = root - table if split else root
    own = table * size / world if split and size != 4 else 0  # (the compute dtype's copy of its rows)

    def step(chunk, extra=0):
        backward_start = (12 * n / world + (gathered + 2 * block) * size + own + activations + tokens * d * size
                          + V * d * 4 / (world if split else 1) + chunk * (2 if split else 1))
        backward_end = (16 * n / world + gathered * size + 2 * gathered * 4 + gathered * 4 / world + retained
                        + (2 * table * 4 / world if split else 0))
        optimizer = 16 * n / world + adam_temporaries
        return max(backward_start, backward_end, optimizer) + extra

    stages = {
        "load": (load_bytes(params, world, 4, config_bytes(config)), "fp32 shards, one slice being read"),
        "train step": (step(rows * V * (size + 3 * 4 + capped)),
                       "fp32 weights, gradients and AdamW's two moments (1/world each); gathered root and blocks; "
                       "activations; the loss's gradients and chunk"),
        "export (above training)": ((largest * 4 if world > 1 else 0) + (largest * export_dtype.itemsize if
                                    export_dtype not in (None, torch.float32) else 0),
                                    "one gathered tensor (one process: the shard is the tensor)"),
    }
    if teacher is not None:
        t = shapes(teacher)
        # Split by heads (parallel.tensor_parallel): no block is ever gathered, but every process runs every
        # process's rows; on a CPU an untied embedding in the compute dtype is mapped from its file (rows looked up
        # only). Else FSDP2's blocks: two gathered at a time.
        heads = tensor_parallel(teacher, world)
        if heads and not teacher.tie_embeddings and device == "cpu" and config_bytes(teacher) == size:
            t.pop("model.embed_tokens.weight")
        tn = sum(math.prod(s) for s in t.values())
        tblock = sum(math.prod(s) for k, s in t.items() if k.startswith("model.layers.")) / teacher.n_layers
        hidden_states = (world if heads else 1) * tokens * teacher.dim * size
        held = tn * size / world + (0 if heads else 2 * tblock * size) + hidden_states
        stages["load teacher"] = (load_bytes(t, world, size, config_bytes(teacher)),
                                  "the teacher's shards in the compute dtype")
        stages["distill step (teacher + student)"] = (
            step(min(tokens, loss_chunk_rows(V, distillation=True)) * V * (
                3 * size + 10 * 4 + capped + (2 * size if teacher.logit_softcap is not None else 0)), extra=held),
            "the teacher's shards in the compute dtype (FSDP2's: and two gathered blocks) and its hidden states; the "
            "student's step, with the distillation loss's chunk")
    return stages


def load_bytes(params, world, size, stored):
    """The peak of Transformer.load_rows: the shards filled so far, plus the slice being read when the stored dtype
    is not the model's (a shard's memory becomes resident as it is filled)."""
    filled = peak = 0
    for shape in params.values():
        shard = math.prod(shape) / world
        peak = max(peak, filled + shard * size + (shard * stored if stored != size else 0))
        filled += shard * size
    return peak


def config_bytes(config):
    """Bytes per value of the checkpoint's stored dtype."""
    return to_dtype(config.dtype).itemsize


def plan_table(plans):
    """{model name: plan(...)} -> a markdown table, one row per model, GB per process at each stage."""
    stages = list(next(iter(plans.values()))[1])
    lines = ["| model | parameters | " + " | ".join(stages) + " |", "| --- " * (len(stages) + 2) + "|"]
    for name, (config, stage) in plans.items():
        lines.append(f"| {name} | {config.num_params() / 1e9:.2f} B | " +
                     " | ".join(f"{stage[s][0] / 2**30:.1f} GB" for s in stages) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Measuring the plan against the real thing: 1 and 2 processes of train.py and distill.py (CPU, gloo)

MEASURED = dict(model_type="qwen2", dim=896, n_layers=12, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                vocab_size=151936, tie_embeddings=True, qkv_bias=True, max_seq_len=2048)


def make_checkpoint(path, data_root, shape=MEASURED):
    """A random checkpoint of MEASURED's shape (315M parameters, Qwen2.5's vocabulary size), or another, with a
    small BPE tokenizer of the telco corpus (the model's vocabulary is padded past it, as Qwen's is)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape))
    model.init_weights()
    tokenizer = Tokenizer.train(list(read_documents(corpus_files(data_root, "telco", "train"))), 1024)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)


def run(cmd, nproc, env=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    t0 = time.time()
    subprocess.run(launcher + cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.time() - t0


def measured(out):
    """{stage: peak MB per process} of a finished run, above the process's RSS before loading (the export and the
    acceptance stages: above their own start, what they add), and the whole run's peak itself."""
    record = read_json(os.path.join(out, "memory.json"))
    base = record["load"]["start_mb"]
    whole = record.pop(WHOLE_RUN)["peak_mb"]
    result = {name: [p - b for p, b in zip(e["peak_mb"], base if name == "load" else e["start_mb"])]
              for name, e in record.items()}
    result[WHOLE_RUN] = whole  # (what the machine must find: not above the baseline)
    result["export (above training)"] = result.pop("export")
    result["step"] = [p - b for p, b in zip(step_peaks(out), base)]
    return result, max(base)


def loss_peak(ckpt, seq_len, chunked):
    """Peak MB above the start of one forward + backward of a 1 x seq_len batch, the loss chunked
    (Transformer.loss) or on the whole logits (the formula before model.ChunkedLoss)."""
    device = torch.device("cpu")
    model = Transformer.from_pretrained(ckpt, dtype=torch.float32)
    batch = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1], batch[:, 1:]
    reset_peak(device, trim=True)
    start = current_mb(device)
    loss = model.loss(x, y) if chunked else \
        F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum")
    loss.backward()
    return peak_mb(device) - start


def loss_peaks(ckpt, seq_len):
    """loss_peak of both losses, each in a process of its own, and the whole logits' planned share: N x V x 4
    bytes for each of the logits, their log-softmax and its gradient."""
    peaks = {}
    for name, chunked in (("whole logits", False), ("chunked", True)):
        code = f"import memory; print(memory.loss_peak({ckpt!r}, {seq_len}, {chunked}))"
        peaks[name] = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.split()[-1])
    return peaks, 3 * seq_len * read_checkpoint(ckpt)[0].vocab_size * 4 / MB


def measure(args):
    root = args.work
    os.makedirs(root, exist_ok=True)
    ckpt = os.path.join(root, "random-315m")
    make_checkpoint(ckpt, args.data_root)
    config = read_checkpoint(ckpt)[0]
    student = ModelConfig.from_preset("tiny", vocab_size=config.vocab_size, max_seq_len=config.max_seq_len)
    common = ["--domain", "telco", "--data-root", args.data_root, "--seq-len", str(args.seq_len), "--micro-batch-size",
              "1", "--eval-every", "0", "--save-every", "0", "--max-steps", "2", "--warmup-steps", "1"]
    results, times, baselines = {}, {}, []
    for nproc in (1, 2):
        runs = {"train": ["train.py", "--init-from", ckpt, "--replay-ratio", "0", "--eval-windows", "1"],
                "distill": ["distill.py", "--teacher", ckpt, "--student", "tiny", "--data", "text",
                            "--accept-prompts", "1", "--gen-tokens", "4"]}
        for name, cmd in runs.items():
            out = os.path.join(root, f"{name}-{nproc}")
            if not os.path.exists(os.path.join(out, "memory.json")):
                times[f"{name}.py, {nproc} process(es)"] = run(cmd + ["--out", out, "--batch-size", str(nproc),
                                                                      *common], nproc)
            results[name, nproc], base = measured(out)
            baselines.append(base)
    rows = []
    for nproc in (1, 2):
        planned = plan(config, nproc, 1, args.seq_len, torch.float32, device="cpu", export_dtype=torch.float32)
        planned_d = plan(student, nproc, 1, args.seq_len, torch.float32, teacher=config, device="cpu")
        train, distill = results["train", nproc], results["distill", nproc]
        rows += [(nproc, "load", train["load"], planned["load"][0]),
                 (nproc, "distill: load the teacher", distill["load teacher"], planned_d["load teacher"][0]),
                 (nproc, "train step", train["step"], planned["train step"][0]),
                 (nproc, "distill step (teacher + student)", distill["step"],
                  planned_d["distill step (teacher + student)"][0]),
                 (nproc, "export (above training)", train["export (above training)"],
                  planned["export (above training)"][0]),
                 (nproc, "train.py, whole run (not above the baseline)", train[WHOLE_RUN], None),
                 (nproc, "distill.py, whole run (not above the baseline)", distill[WHOLE_RUN], None)]
    one = {stage: max(got) for nproc, stage, got, _ in rows if nproc == 1}
    lines = ["| stage | processes | measured peak per process (MB) | planned (MB) | planned / measured | "
             "2 processes / 1 |", "| --- | --- | --- | --- | --- | --- |"]
    for nproc, stage, got, want in rows:
        ratio = f"{max(got) / one[stage]:.2f}" if nproc == 2 and one[stage] > 0 else ""
        planned_over = f"{want / MB / max(got):.2f}" if want is not None and max(got) > 0 else ""
        lines.append(f"| {stage} | {nproc} | {' / '.join(str(g) for g in got)} | "
                     f"{'' if want is None else f'{want / MB:.0f}'} | {planned_over} | {ratio} |")
    print(f"random checkpoint {ckpt}: {config.num_params() / 1e6:.0f}M parameters ({4 * config.num_params() / MB:.0f}"
          f" MB in fp32), vocabulary {config.vocab_size}; micro-batch 1 x {args.seq_len} tokens, fp32 on CPU; "
          f"measured above each process's RSS before loading (at most {max(baselines)} MB; the export and "
          "the teacher's load: above their own start)")
    print("\n".join(lines))
    if times:
        print("run times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    peaks, share = loss_peaks(ckpt, args.loss_seq_len)
    print(f"\nforward + backward of 1 x {args.loss_seq_len} tokens, one process (peak MB above its start):")
    print("| loss | measured peak (MB) |\n| --- | --- |")
    for name, mb in peaks.items():
        print(f"| {name} | {mb:.0f} |")
    print(f"the chunked loss saves {peaks['whole logits'] - peaks['chunked']:.0f} MB; the whole logits' planned "
          f"share: {share:.0f} MB (logits, log-softmax, gradient: 3 x {args.loss_seq_len} x "
          f"{read_checkpoint(ckpt)[0].vocab_size} x 4 bytes)")


# A teacher that decodes (issue 23's case): a random 0.72B teacher, untied, with Qwen2.5's vocabulary, distilled into
# `tiny` for one step, with the acceptance measurement's decoding before and after
DECODING_TEACHER = dict(model_type="qwen2", dim=1536, n_layers=10, n_heads=12, n_kv_heads=2, hidden_dim=4352,
                        vocab_size=151936, tie_embeddings=False, qkv_bias=True, max_seq_len=2048)


def measure_teacher(args):
    """Each process's whole-run peak and the wall time of distill.py from DECODING_TEACHER with 1 and 2 processes,
    one thread each."""
    ckpt = os.path.join(args.work, "random-722m-untied")
    os.makedirs(args.work, exist_ok=True)
    make_checkpoint(ckpt, args.data_root, DECODING_TEACHER)
    cmd = ["distill.py", "--teacher", ckpt, "--student", "tiny", "--domain", "telco", "--data-root", args.data_root,
           "--data", "text", "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "1", "--seq-len", "64",
           "--eval-every", "0", "--save-every", "0", "--accept-prompts", "1", "--gen-tokens", "8"]
    lines = ["| processes | whole-run peak per process (MB) | wall time (s) |", "| --- | --- | --- |"]
    first = None
    for nproc in (1, 2):
        out = os.path.join(args.work, f"decoding-teacher-{nproc}")
        if os.path.exists(out):
            shutil.rmtree(out)
        seconds = run(cmd + ["--out", out], nproc, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peaks = read_json(os.path.join(out, "memory.json"))[WHOLE_RUN]["peak_mb"]
        first = first or (max(peaks), seconds)
        ratio = f" ({max(peaks) / first[0]:.2f}x)" if nproc > 1 else ""
        lines.append(f"| {nproc} | {' / '.join(map(str, peaks))}{ratio} | {seconds:.0f}"
                     f"{f' ({seconds / first[1]:.2f}x)' if nproc > 1 else ''} |")
    print(f"distill.py from a random {DECODING_TEACHER['n_layers']}-layer untied teacher ({ckpt}) into `tiny`, one "
          "step, acceptance measured before and after, OMP_NUM_THREADS=1:")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="planned peak memory per process of each stage")
    pp.add_argument("model", nargs="+", help=f"HF directories, presets ({', '.join(PRESETS)}) or {', '.join(PUBLIC)}")
    pp.add_argument("--world", type=int, default=8, help="processes (GPUs)")
    pp.add_argument("--micro-batch-size", type=int, default=4)
    pp.add_argument("--seq-len", type=int, default=2048)
    pp.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="the compute dtype")
    pp.add_argument("--teacher", default=None, help="plan distillation from this teacher (MODEL is the student)")
    pp.add_argument("--activation-checkpointing", action="store_true")
    pp.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="(AdamW is fused on GPU only)")
    pm = sub.add_parser("measure", help="measure 1 and 2 processes on a random 315M checkpoint, beside the plan")
    pm.add_argument("--work", default=os.path.join("out", "memory"))
    pm.add_argument("--data-root", default="data")
    pm.add_argument("--seq-len", type=int, default=512)
    pm.add_argument("--loss-seq-len", type=int, default=2048, help="tokens of the chunked-loss comparison")
    pt = sub.add_parser("measure-teacher", help="whole-run peak and time of a distillation from a random 0.72B "
                        "teacher that decodes, with 1 and 2 processes")
    pt.add_argument("--work", default=os.path.join("out", "memory"))
    pt.add_argument("--data-root", default="data")
    args = p.parse_args(argv)
    if args.command == "measure-teacher":
        return measure_teacher(args)
    for flag in ("world", "micro_batch_size", "seq_len", "loss_seq_len"):  # (a plan of 0 processes is no plan)
        if getattr(args, flag, 1) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.command == "measure":
        return measure(args)
    try:
        configs = {name: model_config(name) for name in args.model}
        teacher = model_config(args.teacher) if args.teacher else None
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    dtype = to_dtype(args.dtype)
    plans = {name: (c, plan(c, args.world, args.micro_batch_size, args.seq_len, dtype, teacher,
                            args.activation_checkpointing, args.device, to_dtype(c.dtype)))
             for name, c in configs.items()}
    print(f"planned peak memory per process: {args.world} processes, micro-batch {args.micro_batch_size} x "
          f"{args.seq_len} tokens, {args.dtype} compute, fp32 weights and AdamW"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}"
          f"{f', distilled from {args.teacher}' if teacher else ''}")
    print(plan_table(plans))


if __name__ == "__main__":
    main()
