"""
A run's folder, <out>/: claimed with a lock for as long as the run lives; its settings in run.json, which a --resume
must match; a row per step in metrics.jsonl; resumable checkpoints under checkpoints/step_NNNNNN/; and at the end the
HF directory itself, exported one tensor at a time.

A checkpoint is safetensors and JSON only, so resuming never unpickles anything (a pickle can run code): the model
and optimizer shards through torch.distributed.checkpoint's safetensors storage (each process writes its own shards
with their offsets in the file header; any number of processes can read them back), and each process's step and RNG
state as JSON.
"""
import base64
import json
import os
import shutil
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from files import fsync, lock_dir, read_json, sweep_temporaries, write_atomic
from hf import MAX_SHARD_SIZE, write_order, write_weights
from parallel import full_tensor, log, on_rank0

# -----------------------------------------------------------------------------
# Claiming the folder


# Settings that change nothing a run learns: a --resume may change them (and the number of processes). A command
# adds its own (prepare_out's free).
FREE_ON_RESUME = {"resume", "eval_every", "eval_windows", "save_every", "keep_checkpoints", "compile",
                  "activation_checkpointing", "micro_batch_size"}
COMPLETE = "complete.json"  # written last by a finished run
LOCKS = []  # the lock files of the output directories this process holds (open until it exits)


def prepare_out(out, args, inputs, free=()):
    """Claim --out for this run before any work (on rank 0): refuse an --out that is one of the input directories
    (inputs: {flag: path}) or inside one; hold the lock on it; refuse one that holds another run unless --resume,
    and a --resume whose settings differ from the run's own (<out>/run.json) in anything that decides what is
    learned (all but FREE_ON_RESUME and the command's own free settings). record_run writes a new run's settings."""
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
        sweep_temporaries(out)  # what a killed run's writes left
        if args.resume and os.path.exists(settings_file):
            saved = read_json(settings_file)
            changed = [k for k in dict.fromkeys([*saved, *settings])
                       if k not in FREE_ON_RESUME | set(free) and saved.get(k) != settings.get(k)]
            if changed:
                raise SystemExit(f"--resume: {out} was started with other settings: " + ", ".join(
                    f"--{k.replace('_', '-')} {saved.get(k)} (now {settings.get(k)})" for k in changed) +
                    "; resume with the run's own settings, or start a new run in another --out")
    on_rank0(claim)


def record_run(out, args):
    """A new run's settings in <out>/run.json, written once its inputs have loaded: a start that fails on a missing
    or broken input leaves nothing that would refuse the corrected command."""
    if not args.resume:
        on_rank0(lambda: write_atomic(os.path.join(out, "run.json"), json.dumps(
            {k: v for k, v in vars(args).items() if k != "resume"}, indent=1) + "\n"))


def finish(out, **summary):
    """The run's last write: <out>/complete.json. Until it exists the folder is visibly unfinished (workshop.sh
    resumes such a stage, report.py says so), even when the model files are already there."""
    on_rank0(lambda: write_atomic(os.path.join(out, COMPLETE), json.dumps(summary, indent=1) + "\n"))


def is_complete(out):
    return os.path.isfile(os.path.join(out, COMPLETE))


def holds_run(out):
    """Whether a run was started in out (finished or not): it has its settings, metrics or checkpoints."""
    return any(os.path.exists(os.path.join(out, name)) for name in ("run.json", "metrics.jsonl")) \
        or bool(checkpoint_dirs(out))


def inside(path, folder):
    """Whether path is folder or lies inside it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# -----------------------------------------------------------------------------
# Resumable checkpoints


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


# -----------------------------------------------------------------------------
# metrics.jsonl: a row per optimizer step


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


def first_eval(out):
    """The evaluation before training: metrics.jsonl's first row (step 0)."""
    if dist.get_rank() != 0:
        return {}
    return read_metrics(os.path.join(out, "metrics.jsonl"))[0]


# -----------------------------------------------------------------------------
# The HF directory


def export_hf(model, config, tokenizer, out, dtype):
    """Write <out> as an HF directory: weights (in dtype) and config, every tokenizer file (chat template included)
    and generation_config.json, so transformers, vLLM and lm-eval-harness load it as they load the checkpoint it
    came from. The weights stream out one tensor at a time: every process takes part in gathering each one, rank 0
    writes it into its file and lets it go, so the export needs one tensor more than training, not the whole model
    (twice) on rank 0. The files are those Transformer.save_pretrained writes, byte for byte."""
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_embeddings)}
    specs = {k: (tuple(v.shape), dtype) for k, v in state.items()}
    tensors = (full_tensor(state[k]).to(dtype) for k in write_order(specs, MAX_SHARD_SIZE))
    if dist.get_rank() == 0:  # config.json last: a folder that has it holds the whole model
        tokenizer.save_pretrained(out)
        write_generation_config(out, config, tokenizer.source)
        write_weights(out, replace(config, dtype=str(dtype).removeprefix("torch.")).to_hf(), specs, tensors,
                      MAX_SHARD_SIZE)
    else:
        for _ in tensors:  # the same gathers, in the same order, as rank 0's
            pass
    dist.barrier()


def write_generation_config(out, config, source):
    """The source checkpoint's generation defaults (sampling settings and all), with this model's bos id and every
    eos id of both: the source's stop tokens (Qwen2.5-Instruct's generation_config stops at <|endoftext|> as well
    as config.json's <|im_end|>) and this model's (SFT adds the end-of-turn token)."""
    generation = read_json(os.path.join(source, "generation_config.json"), {}) if source else {}
    if config.bos_token_id is not None:
        generation["bos_token_id"] = config.bos_token_id
    eos = [generation.get("eos_token_id"), config.eos_token_id]
    eos = [i for ids in eos for i in (ids if isinstance(ids, list) else [ids]) if i is not None]
    if eos:
        eos = list(dict.fromkeys(eos))
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    write_atomic(os.path.join(out, "generation_config.json"), json.dumps(generation, indent=2) + "\n")
