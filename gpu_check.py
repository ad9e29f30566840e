"""
What the README's GPU rows need, measured in one command on a machine with one (or two) NVIDIA GPUs, in under 10
minutes including compilation:

1. train       a bf16 training step of a random model of Qwen2.5-0.5B's shape, as `python train.py` runs it (FSDP2
               in a group of one, train.py's AdamW, the chunked loss), eager and with each block compiled
               (train.py --compile): tokens/s, MFU and peak memory
2. decode      batch-1 greedy decoding of the same model in bf16 (speculative.generate), eager and compiled, against
               its memory-bandwidth limit: weight bytes per token over the copy bandwidth measured here
3. speculative speculative_generate against plain greedy generate: tokens/s, acceptance, the draft's cost ratio c
               and the verification pass's cost. Without --target/--draft the target is the random model and the
               draft its first layers (distill.py --student-layers): acceptance of a random pair means nothing,
               only the mechanics and the costs do
4. sharded     distill.py with its teacher sharded over 2 processes against 1 process (2 GPUs only): peak memory
               per process and tokens/s, from each run's memory.json and metrics.jsonl

    python gpu_check.py                                    # on the GPU machine; the table, and out/gpu-check.json
    python gpu_check.py --target out/telco-sft --draft out/telco-draft   # section 3 on real checkpoints
    python gpu_check.py --tiny                             # tiny shapes on a CPU: a smoke test, not a benchmark

The README's GPU rows and docs/benchmarks.md's "On a GPU" section come from its output. Each section runs on its
own: one that fails (torch.compile missing, out of memory) is a row "failed: ..." and the others still run.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import memory
import speculative
from checkpoint import read_metrics
from data import corpus_files, read_documents
from files import read_json, write_atomic
from model import ModelConfig, Transformer, pack
from parallel import PEAK_FLOPS, by_gpu_name, compute_dtype, setup_distributed, shard_model
from speculative import (compare_decoders, copy_bandwidth, cost_ratio, decode_dtype, generate, load, load_draft,
                         pooled_stats, predicted_speedup, prompt_ids, speculative_generate, timed, truncate,
                         verify_cost, weight_bytes)
from tokenizer import Tokenizer
from train import make_optimizer

# The shapes of a run: the GPU's (the 0.5B model the README plans for, 8 x 2048 tokens per step, a 4-layer draft, a
# 2 GiB copy, memory.py's 315M teacher) and --tiny's (a CPU runs it in seconds; its numbers mean nothing).
FULL = dict(tiny=False, model="Qwen2.5-0.5B", batch=8, seq_len=2048, warmup=3, steps=5, copy_bytes=2 * 2**30,
            prompts=4, prompt_len=32, new_tokens=256, draft_layers=4, teacher=memory.MEASURED, distill_seq_len=1024)
TINY_MODEL = dict(model_type="qwen2", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=1024,
                  tie_embeddings=True, qkv_bias=True, max_seq_len=256)
TINY = dict(tiny=True, model="tiny Qwen2", batch=2, seq_len=32, warmup=1, steps=2, copy_bytes=16 * 2**20,
            prompts=2, prompt_len=8, new_tokens=16, draft_layers=1, teacher=TINY_MODEL, distill_seq_len=64)
GAMMA = 4  # draft tokens per round
PROMPTS = ["What is VoLTE and how does it carry voice?", "Why does a handover fail when the target cell is full?",
           "Explain the role of the P-CSCF in the IMS core.", "How is data usage counted against a monthly cap?"]
EAGER_FORWARD = speculative.model_forward  # compile_decoding() replaces it; a failed compile puts this back
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def random_model(config, device, seed=0):
    """A new fp32 model on the device, random as model.init_weights draws it (same seed: the same weights)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config)
    model.init_weights()
    return model


def attempt(name, fn):
    """fn()'s result, or {"failed": one line} when it raises: one section's failure must not hide the others."""
    try:
        return fn()
    except Exception as e:  # (KeyboardInterrupt still stops the run)
        line = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
        print(f"[{name}] failed: {line}", flush=True)
        return {"failed": line}


# -----------------------------------------------------------------------------
# 1. Training step: MFU and peak memory


def train_steps(config, shape, device, compiled, n_steps):
    """Median step time and peak memory of the training step train_loop runs: FSDP2 in a group of one (fp32 weights,
    bf16 compute on GPU), each block compiled first when `compiled` (train.py --compile), the chunked loss over the
    batch's tokens, backward, gradient clipping, AdamW. Warm-up steps (allocator, kernels, compilation) untimed."""
    dtype = compute_dtype(None, device)
    model = shard_model(random_model(config, device), device, dtype, compile=compiled)
    optimizer = make_optimizer(model, 0.1, device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-5  # (train_loop sets it at every step)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (shape["batch"], shape["seq_len"] + 1), generator=g).to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    def step():
        loss = model.loss(x, y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    times = []
    for i in range(shape["warmup"] + n_steps):
        if i == shape["warmup"]:
            memory.reset_peak(device)  # the steady state's peak, not compilation's
        loss, dt = timed(step, device)
        print(f"[train] {'compiled' if compiled else 'eager'} step {i + 1}/{shape['warmup'] + n_steps}: "
              f"{dt * 1e3:.0f} ms, loss {loss.item():.4f}{'' if i >= shape['warmup'] else ' (warm-up)'}", flush=True)
        times.append(dt)
    step_s = statistics.median(times[shape["warmup"]:])
    tokens = shape["batch"] * shape["seq_len"]
    peak = by_gpu_name(PEAK_FLOPS, device)
    # MFU (Chowdhery et al. 2022) as train_loop computes it: the model FLOPs of the step (6 N per token plus the
    # attention's, ModelConfig.flops_per_token) per second, over the GPU's peak dense bf16 FLOP/s. None on a CPU.
    flops = config.flops_per_token(shape["seq_len"]) * tokens
    return dict(steps=n_steps, step_s=step_s, tokens_per_s=tokens / step_s, flops_per_step=flops, peak_flops=peak,
                mfu=flops / step_s / peak if peak else None, peak_mb=memory.peak_mb(device), last_loss=loss.item())


def check_train(config, shape, device, n_steps):
    setup_distributed()  # (train.py's: a process group of one, which FSDP2 needs)
    result = dict(model=shape["model"], params=config.num_params(), batch=shape["batch"], seq_len=shape["seq_len"],
                  compute_dtype=str(compute_dtype(None, device)).removeprefix("torch."), runs={})
    for mode in ("eager", "compiled"):
        if mode == "compiled" and shape["tiny"]:  # (decoding is still compiled in --tiny: its graphs are small)
            result["runs"][mode] = dict(skipped="--tiny: compiling a training step takes half a minute on a CPU")
            continue
        print(f"[train] {mode}: {config.num_params() / 1e6:.0f}M parameters, {shape['batch']} x {shape['seq_len']} "
              "tokens per step", flush=True)
        result["runs"][mode] = attempt("train", lambda: train_steps(config, shape, device, mode == "compiled",
                                                                    n_steps))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # (the eager run's model and optimizer are gone: give the next one the room)
    return result


# -----------------------------------------------------------------------------
# 2. Batch-1 decoding against the memory-bandwidth limit


def decode_tokens_per_s(model, prompts, new_tokens, device):
    """(tokens/s, outputs) of greedy generate over the prompts, after one untimed warm-up (cache, compilation)."""
    generate(model, prompts[0], new_tokens)
    runs = [timed(lambda: generate(model, ids, new_tokens), device) for ids in prompts]
    return sum(len(out) for out, _ in runs) / sum(t for _, t in runs), [out for out, _ in runs]


def check_decode(target, shape, prompts, device):
    dtype, nbytes = target.lm_head.weight.dtype, weight_bytes(target)  # (what one decoding step reads)
    copy_s, bandwidth = copy_bandwidth(device, shape["copy_bytes"])
    result = dict(params_read=nbytes // dtype.itemsize, bytes_per_param=dtype.itemsize, weight_bytes=nbytes,
                  copy_bytes=shape["copy_bytes"], copy_s=copy_s, bandwidth_bytes_per_s=bandwidth,
                  limit_tokens_per_s=bandwidth / nbytes, dtype=str(dtype).removeprefix("torch."),
                  prompts=len(prompts), new_tokens=shape["new_tokens"], runs={})
    print(f"[decode] copy bandwidth {bandwidth / 1e9:.1f} GB/s: at most {result['limit_tokens_per_s']:,.0f} tokens/s "
          f"for {result['weight_bytes'] / 1e9:.3f} GB of weights per token", flush=True)
    outputs = {}
    for mode in ("eager", "compiled"):
        def run():
            if mode == "compiled":
                speculative.compile_decoding()  # the decode step compiled (CUDA graphs on GPU), as --compile does
            tokens_per_s, outputs[mode] = decode_tokens_per_s(target, prompts, shape["new_tokens"], device)
            return dict(tokens_per_s=tokens_per_s, fraction_of_limit=tokens_per_s / result["limit_tokens_per_s"])
        print(f"[decode] {mode}: {len(prompts)} prompts x {shape['new_tokens']} new tokens, batch 1", flush=True)
        result["runs"][mode] = attempt("decode", run)
        if "failed" in result["runs"][mode]:
            speculative.model_forward = EAGER_FORWARD  # (the sections after this one decode eagerly)
    if len(outputs) == 2:  # (bf16 rounding may differ between the compiled and eager kernels)
        result["identical_compiled_eager"] = sum(a == b for a, b in zip(outputs["eager"], outputs["compiled"]))
    return result


# -----------------------------------------------------------------------------
# 3. Speculative against plain decoding


def check_speculative(args, target, shape, random_prompts, device):
    if args.target:
        target, tokenizer = load(args.target, device, decode_dtype(None, device))
        prompts = [prompt_ids(target, tokenizer, p) for p in PROMPTS[:shape["prompts"]]]
    else:
        prompts = random_prompts
    if args.draft:
        draft = load_draft(args.draft, device, decode_dtype(None, device))[0]  # (its reduced head, if it has one)
    else:
        # (packed as load's models are: a copy is not)
        draft = pack(truncate(copy.deepcopy(target), min(shape["draft_layers"], target.config.n_layers)))
    random_pair = not args.target
    note = ("random target and its truncated copy: acceptance is not meaningful, only the mechanics, c and the "
            "verification cost are" if random_pair else f"target {args.target}, draft " +
            (args.draft or f"its first {draft.config.n_layers} layers, not distilled"))
    print(f"[speculative] {note}; {len(prompts)} prompts x {shape['new_tokens']} tokens, greedy, gamma {GAMMA}",
          flush=True)
    runs = []

    def plain(ids):  # (no eos: every run writes exactly new_tokens)
        return generate(target, ids, shape["new_tokens"])

    def spec(ids):
        out, stats = speculative_generate(target, draft, ids, shape["new_tokens"], gamma=GAMMA)
        runs.append(stats)
        return out
    (n_plain, t_plain, _), (n_spec, t_spec, same) = compare_decoders([plain, spec], prompts, device)
    a = pooled_stats(runs[1:], GAMMA)["acceptance_rate"]  # (runs[0]: compare_decoders' warm-up)
    with torch.no_grad():  # (with autograd on, the timed steps would record graphs, and compile another variant)
        c, v = cost_ratio(target, draft), verify_cost(target, GAMMA)
    return dict(note=note, random_pair=random_pair, gamma=GAMMA, prompts=len(prompts),
                compiled=speculative.model_forward is not EAGER_FORWARD,
                draft_layers=draft.config.n_layers, target_layers=target.config.n_layers,
                plain_tokens_per_s=n_plain / t_plain, speculative_tokens_per_s=n_spec / t_spec,
                speedup=(n_spec / t_spec) / (n_plain / t_plain), acceptance_rate=a, cost_ratio=c, verify_cost=v,
                predicted_speedup=predicted_speedup(a, GAMMA, c, v), identical_outputs=same,
                tokens_plain=n_plain, tokens_speculative=n_spec)


# -----------------------------------------------------------------------------
# 4. The sharded teacher: distill.py in 1 and 2 processes


def teacher_checkpoint(path, config, data_root):
    """A random teacher of config's shape with a 1,024-token BPE tokenizer of the telco corpus (the model's
    vocabulary padded past it, as Qwen's is): memory.make_checkpoint's recipe, of any shape."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**config))
    model.init_weights()
    model.save_pretrained(path)
    Tokenizer.train(list(read_documents(corpus_files(data_root, "telco", "train"))), 1024).save_pretrained(path)


def distill_run(teacher, out, nproc, seq_len, data_root):
    """distill.py on the random teacher, plainly or under torchrun: wall time, peak memory per process, tokens/s."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc)]
    cmd = launcher + ["distill.py", "--teacher", teacher, "--student", "tiny", "--data", "text", "--domain", "telco",
                      "--data-root", data_root, "--seq-len", str(seq_len), "--batch-size", str(nproc),
                      "--micro-batch-size", "1", "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "0",
                      "--save-every", "0", "--accept-prompts", "1", "--gen-tokens", "4", "--out", out]
    # this process's own group of one (section 1) must not leak its rank and port into the children
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:  # (the line that says why: torchrun ends its report with a rule of "=")
        lines = [line for line in done.stderr.splitlines() if line.strip().strip("=-")] or [""]
        why = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1])
        raise RuntimeError(f"{' '.join(cmd[1:3])}... exited {done.returncode}: {why.strip()}")
    # each process's peak (GPU: max allocated; CPU: max RSS) while loading the teacher, and in the training steps
    stages = read_json(os.path.join(out, "memory.json"), {})
    steps = [r["tokens_per_s"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "tokens_per_s" in r]
    return dict(processes=nproc, wall_s=time.perf_counter() - t0,
                peak_mb_load_teacher=stages["load teacher"]["peak_mb"], peak_mb_step=memory.step_peaks(out),
                tokens_per_s=statistics.median(steps[1:] or steps))


def check_sharded(shape, data_root="data"):
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher")
        teacher_checkpoint(teacher, shape["teacher"], data_root)
        print(f"[sharded] random teacher {ModelConfig(**shape['teacher']).num_params() / 1e6:.0f}M in {teacher}; "
              "distill.py in 1 then 2 processes", flush=True)
        runs = {str(n): attempt("sharded", lambda: distill_run(teacher, os.path.join(tmp, f"out-{n}"), n,
                                                               shape["distill_seq_len"], data_root)) for n in (1, 2)}
    return dict(teacher_params=ModelConfig(**shape["teacher"]).num_params(), seq_len=shape["distill_seq_len"],
                runs=runs)


# -----------------------------------------------------------------------------
# The table and the command line


def cell(run, text):
    """A row's result: text(run), or why there is none."""
    return next((f"{key}: {run[key]}" for key in ("failed", "skipped") if key in run), None) or text(run)


def table(r):
    """The markdown table of a result: one row per measurement, or one per section saying why there is none."""
    tr, dec, sp, sh = r["train"], r["decode"], r["speculative"], r["sharded"]
    rows = []
    for name, section in (("train step", tr), ("batch-1 decoding", dec), ("speculative decoding", sp),
                          ("sharded teacher", sh)):
        if "failed" in section or "skipped" in section:
            rows.append((name, cell(section, str), ""))
        elif section is tr:
            for mode, run in tr["runs"].items():
                rows.append((f"train step, {tr['model']} {tr['batch']}x{tr['seq_len']}, {mode}", cell(run, lambda x: (
                    f"{x['tokens_per_s']:,.0f} tokens/s, MFU {'n/a' if x['mfu'] is None else format(x['mfu'], '.1%')}"
                    f", peak {x['peak_mb']:,.0f} MB")), f"{tr['compute_dtype']} compute, median of the timed steps; "
                    "peak: max allocated (GPU), process RSS (CPU)"))
        elif section is dec:
            rows.append(("copy bandwidth", f"{dec['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s", f"2 x "
                         f"{dec['copy_bytes'] / 2**20:,.0f} MiB moved: at most {dec['limit_tokens_per_s']:,.0f} "
                         f"tokens/s for {dec['weight_bytes'] / 1e6:,.1f} MB of weights per token"))
            for mode, run in dec["runs"].items():
                rows.append((f"batch-1 decoding, {dec['dtype']}, {mode}", cell(run, lambda x: (
                    f"{x['tokens_per_s']:,.1f} tokens/s, {x['fraction_of_limit']:.1%} of the limit")),
                    f"{dec['prompts']} prompts x {dec['new_tokens']} tokens"))
        elif section is sp:
            rows.append((f"speculative greedy, gamma {sp['gamma']}, {sp['draft_layers']} of {sp['target_layers']} "
                         f"layers", f"{sp['speculative_tokens_per_s']:,.1f} vs {sp['plain_tokens_per_s']:,.1f} "
                         f"tokens/s plain: {sp['speedup']:.2f}x", f"acceptance {sp['acceptance_rate']:.3f}, c "
                         f"{sp['cost_ratio']:.3f}, verify {sp['verify_cost']:.2f} steps, predicted "
                         f"{sp['predicted_speedup']:.2f}x, identical {sp['identical_outputs']}/{sp['prompts']}; "
                         f"{sp['note']}"))
        else:
            for n, run in sh["runs"].items():
                rows.append((f"distill.py, random teacher {sh['teacher_params'] / 1e6:,.1f}M, {n} process(es)",
                             cell(run, lambda x: "peak MB per process: teacher load "
                                  f"{' / '.join(map(str, x['peak_mb_load_teacher']))}, step "
                                  f"{' / '.join(map(str, x['peak_mb_step']))}; {x['tokens_per_s']:,.0f} tokens/s"),
                             f"{run.get('wall_s', 0):.0f} s wall"))
    return "\n".join(["| measurement | result | notes |", "| --- | --- | --- |"] +
                     [f"| {a} | {b} | {c} |" for a, b, c in rows])


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke test in seconds, not a benchmark")
    p.add_argument("--steps", type=int, help="timed training steps (default 5; --tiny 2)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per decoded prompt (default 256; --tiny 16)")
    p.add_argument("--target", help="HF directory of a real target for section 3 (default: the random model)")
    p.add_argument("--draft", help="HF directory of its distilled draft (default: the target's first layers)")
    p.add_argument("--out", default=os.path.join("out", "gpu-check.json"), help="the JSON of every number")
    args = p.parse_args(argv)
    if min(args.steps or 1, args.max_new_tokens or 1) < 1:
        p.error("--steps and --max-new-tokens must be >= 1")
    if args.draft and not args.target:
        p.error("--draft needs --target (the draft of which model?)")
    return args


def main(argv=None):
    args = get_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("error: no GPU here; gpu_check.py measures a GPU (on a CPU run `python gpu_check.py "
                         "--tiny`: tiny shapes, a smoke test, not a benchmark)")
    shape = dict(TINY if args.tiny else FULL)
    shape["new_tokens"] = args.max_new_tokens or shape["new_tokens"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = ModelConfig(**TINY_MODEL) if args.tiny else memory.model_config(FULL["model"])  # (memory.PUBLIC's)
    t0 = time.perf_counter()
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  gpus=torch.cuda.device_count(), torch=torch.__version__, tiny=args.tiny)
    print(f"gpu_check: {result['device']}, torch {torch.__version__}, {'tiny' if args.tiny else 'full'} shapes",
          flush=True)
    result["train"] = attempt("train", lambda: check_train(config, shape, device, args.steps or shape["steps"]))

    # sections 2 and 3 decode a bf16 (GPU) / fp32 (CPU) copy of the random model, from random-token prompts
    target = attempt("decode", lambda: random_model(config, device).to(decode_dtype(None, device) or torch.float32))
    none = isinstance(target, dict)  # (then it is {"failed": why})
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (shape["prompt_len"],), generator=g).tolist()
               for _ in range(shape["prompts"])]
    result["decode"] = target if none else attempt("decode", lambda: check_decode(target, shape, prompts, device))
    result["speculative"] = target if none and not args.target else attempt(
        "speculative", lambda: check_speculative(args, target, shape, prompts, device))

    if torch.cuda.device_count() >= 2:
        result["sharded"] = attempt("sharded", lambda: check_sharded(shape))
    else:
        result["sharded"] = dict(skipped="1 GPU" if device.type == "cuda" else "no GPU (needs 2)")
        print(f"[sharded] skipped: {result['sharded']['skipped']}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    result["wall_s"] = time.perf_counter() - t0
    result["table"] = table(result)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\n{result['table']}\n\n{result['wall_s']:.0f} s in all; every number in {args.out}")


if __name__ == "__main__":
    main()
