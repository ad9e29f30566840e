"""
Curriculum SFT, as SOAEsV2 does it after continual pretraining: supervised fine-tuning on conversations, stage by
stage from weakly related data to expert-annotated domain data ("domain-progressive"), instead of all at once.

    python sft.py --init-from out/telco --domain telco                 # stages: data/telco/sft/*.jsonl, by name
    python sft.py --init-from out/telco --domain telco --epochs 1,1,2 --lr 1e-4,1e-4,5e-5
    python sft.py --init-from out/telco --domain telco --single-stage --out out/telco-sft-single   # the ablation
    python sft.py --init-from models/gemma3-270m --domain telco --chat-template data/chat_templates/gemma.jinja
    torchrun --nproc_per_node=2 sft.py --init-from out/telco --domain telco

Conversations are rendered by the checkpoint's own chat template (chat.render_chat), or by --chat-template FILE for a
checkpoint without one (a base model) or in place of its own, and only the assistant turns are trained. Each stage
has its own epochs and peak LR (warmup, then cosine to a tenth of it) and its validation loss is logged after it
(data/<domain>/sft/val/<stage>.jsonl). The loop is train.py's; checkpoints, resume and the HF export are
checkpoint.py's.
The output is an HF chat model: its config lists the end-of-turn token as an eos, as instruct checkpoints do, and its
tokenizer_config.json holds the template it was trained with.
"""
import argparse
import os
from pathlib import Path

import torch

import memory
from chat import add_chat_template_flag, chat_end_of_turn, use_chat_template
from checkpoint import checkpoint_dirs, export_hf, finish, prepare_out, read_metrics, record_run, resume
from data import Curriculum, read_conversations, sft_files, sft_row
from model import IGNORE, check_tokenizer, to_dtype
from parallel import check_batch_sizes, compute_dtype, launch, load_sharded, log, setup_distributed
from tokenizer import Tokenizer
from train import (Schedule, add_training_flags, cosine_lr, make_optimizer, next_token_loss, parse_training_args,
                   step_of, train_loop)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", default=None, help="HF directory to fine-tune (default out/<domain>, the DACP "
                   "model)")
    p.add_argument("--stages", default=None, help="comma-separated .jsonl files, in curriculum order (default: "
                   "data/<domain>/sft/*.jsonl in name order)")
    p.add_argument("--epochs", type=stage_values, default="2",
                   help="epochs per stage: one value, or one per stage (1,1,2); a fraction trains on that share of "
                        "the stage's conversations (0.5)")
    p.add_argument("--single-stage", action="store_true", help="shuffle all stages together (SOAEsV2's baseline)")
    p.add_argument("--export-stages", action="store_true", help="also export the model after each stage but the "
                   "last, to <out>/stage-<k>-<name>/ (an HF directory each: eval.py scores what each stage did)")
    add_chat_template_flag(p)
    add_training_flags(p, "out/<domain>-sft", domain="telco", data_root="data", out=None,
                       batch_size=dict(default=16, help="global batch, in conversations"), micro_batch_size=8,
                       seq_len=dict(default=512, help="longer conversations are cut to this many tokens"),
                       lr=dict(type=stage_values, default="2e-4", help="peak LR per stage: one value, or one "
                               "per stage"),
                       warmup_steps=5, weight_decay=0.0, grad_clip=1.0, seed=1337, eval_every=0, save_every=20,
                       keep_checkpoints=2, resume=False, compile=False, activation_checkpointing=False, dtype=None)
    return parse_training_args(p, argv)


def stage_files(args):
    if args.stages:
        files = [Path(f) for f in args.stages.split(",")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"--stages: not found: {', '.join(missing)}")
        return files
    try:
        return sft_files(args.data_root, args.domain)
    except ValueError as e:
        raise SystemExit(f"{e}; or give --stages") from None


def stage_values(text):
    """An argparse type: '1,1,2' -> [1.0, 1.0, 2.0], each value positive (epochs, LRs)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(not 0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"each value must be a number > 0, got {text}")
    return values


def per_stage(flag, values, n):
    """One value per stage: a single value applies to every stage."""
    if len(values) not in (1, n):
        given = ",".join(f"{v:g}" for v in values)
        raise SystemExit(f"--{flag} '{given}': give one value or one per stage ({n} stages)")
    return values * n if len(values) == 1 else values


def tokenize_stage(tokenizer, path, seq_len):
    """The (ids, labels) rows of a stage's conversations, cut to seq_len + 1 tokens. A conversation whose assistant
    turns are all cut away has nothing left to train and is dropped (counted in the log)."""
    rows, cut, dropped = [], 0, 0
    for messages, where in read_conversations(path):
        ids, labels, was_cut = sft_row(tokenizer, messages, seq_len, where)
        if all(t == IGNORE for t in labels):
            dropped += 1
            continue
        rows.append((ids, labels))
        cut += was_cut
    if cut or dropped:
        log(f"{path}: {cut} conversations cut to --seq-len {seq_len} tokens; {dropped} dropped, their assistant "
            f"turns entirely past it; {len(rows)} kept")
    return rows


@torch.no_grad()
def val_losses(model, val, batch_size, device):
    """Mean loss per trained token on each stage's val conversations. Every process runs every batch (the sets are
    small), so FSDP's collectives line up without any bookkeeping."""
    model.eval()
    results = {}
    for name, curriculum in val.items():
        nats = count = 0.0
        for step in range(len(curriculum)):
            batch = torch.from_numpy(curriculum.batch(step)).to(device)
            nats += next_token_loss(model, batch).item()
            count += curriculum.n_trained[step]
        results[f"val/{name}"] = nats / max(count, 1)
    model.train()
    return results


def run(args):
    rank, world, device = setup_distributed()
    check_batch_sizes(args, world)
    init = args.init_from or os.path.join("out", args.domain)
    out = args.out or os.path.join("out", f"{args.domain}-sft")
    if not os.path.isfile(os.path.join(init, "config.json")):
        raise SystemExit(f"--init-from {init}: not an HF model directory (run train.py --domain {args.domain} "
                         "first, or give a checkpoint)")
    tokenizer = Tokenizer.from_pretrained(init)
    args.chat_template_sha256 = use_chat_template(tokenizer, args.chat_template)  # run.json: --resume keeps it
    end_of_turn = chat_end_of_turn(tokenizer)  # (an error naming --chat-template when there is no template)

    # The curriculum: stages in order, each with its epochs and LR; their val sets by the same file name.
    files = stage_files(args)
    epochs = per_stage("epochs", args.epochs, len(files))
    lrs = per_stage("lr", args.lr, len(files))
    stages = [(f.stem, tokenize_stage(tokenizer, f, args.seq_len), e) for f, e in zip(files, epochs)]
    for f, (_, rows, _) in zip(files, stages):
        if not rows:
            raise SystemExit(f"{f}: no conversation has an assistant turn within --seq-len {args.seq_len} tokens")
    curriculum = Curriculum(stages, args.batch_size, args.seed, single_stage=args.single_stage,
                            pad_id=tokenizer.eos_id or 0)
    val = {}
    for f in files:
        vf = f.parent / "val" / f.name
        rows = tokenize_stage(tokenizer, vf, args.seq_len) if vf.is_file() else []
        if rows:
            val[f.stem] = Curriculum([(f.stem, rows, 1)], args.batch_size, args.seed, pad_id=tokenizer.eos_id or 0)
        elif vf.is_file():
            log(f"{vf}: nothing to score within --seq-len {args.seq_len}: no val loss for stage {f.stem}")
    if args.single_stage:
        lrs = lrs[:1]

    prepare_out(out, args, {"init-from": init})
    fresh = not checkpoint_dirs(out)
    with memory.stage(out, "load", device):
        model = load_sharded(init, device, compute_dtype(args.dtype, device), compile=args.compile)
    config = model.config
    check_tokenizer(tokenizer, config, init)
    export_dtype = to_dtype(config.dtype)
    model.activation_checkpointing = args.activation_checkpointing
    optimizer = make_optimizer(model, args.weight_decay, device)
    record_run(out, args)
    start_step = resume(model, optimizer, out) if args.resume else 0

    def lr_fn(step):  # warmup then cosine to a tenth, restarted at each stage with its own peak
        k, _, first, steps = curriculum.stage_of(step)
        return cosine_lr(step - first, lrs[k], lrs[k] / 10, min(args.warmup_steps, steps // 4), steps)

    def get_step(step):
        k, name, first, steps = curriculum.stage_of(step)
        if step == first or (args.resume and step == start_step):
            log(f"stage {k + 1}/{len(curriculum.stages)} {name}: steps {first + 1}-{first + steps}, peak lr "
                f"{lrs[k]:.1e}")
        return step_of(torch.from_numpy(curriculum.batch(step)).to(device), args.micro_batch_size, config)

    if fresh:
        lengths = [len(labels) for _, rows, _ in stages for _, labels in rows]
        unbucketed = Curriculum(stages, args.batch_size, args.seed, single_stage=args.single_stage, pool_batches=1)
        log(f"SFT of {init}: {len(curriculum.stages)} stage(s) "
            f"{', '.join(f'{n} ({s} steps)' for n, _, s in curriculum.stages)}; {len(curriculum)} steps of "
            f"{args.batch_size} conversations of {sum(lengths) / len(lengths):.0f} tokens on average "
            f"({min(lengths)}-{max(lengths)}); padding {curriculum.padding():.1%} of positions "
            f"({unbucketed.padding():.1%} without length bucketing)")

    # A chat model stops at the end of its turn: list <|im_end|> / <|eot_id|> among the eos ids (as Qwen2.5-Instruct
    # and Llama-3-Instruct configs do), so transformers, vLLM and our speculative.py stop there.
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = list(dict.fromkeys([e for e in eos if e is not None] + [end_of_turn]))

    # The curriculum, stage by stage, each on train.py's loop and evaluated as it ends. With --export-stages each
    # stage but the last (the output itself) is exported as it ends, so what each stage did can be evaluated.
    evaluate_fn = (lambda: val_losses(model, val, device=device, batch_size=args.batch_size)) if val else None
    schedule = Schedule(len(curriculum), lr_fn, args.grad_clip, args.eval_every,
                        eval_steps=frozenset(first + steps for _, first, steps in curriculum.stages),
                        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints)
    for k, (name, first, steps) in enumerate(curriculum.stages):
        if first + steps < start_step:
            continue  # finished and exported before this --resume (one resumed at its very end still exports)
        train_loop(model, optimizer, get_step, next_token_loss, schedule, out, start_step=max(first, start_step),
                   stop_step=first + steps, evaluate_fn=evaluate_fn, device=device)
        if args.export_stages and k < len(curriculum.stages) - 1:
            export_hf(model, config, tokenizer, os.path.join(out, stage_dir(k, name)), export_dtype)

    with memory.stage(out, "export", device):
        export_hf(model, config, tokenizer, out, export_dtype)
    memory.record_run_peak(out, device)
    if rank == 0:
        print(stage_table(os.path.join(out, "metrics.jsonl"), curriculum))
        print(memory.table(out))
    finish(out)
    return out


def stage_dir(k, name):
    """The folder, inside the output, of the k-th (from 0) stage's export: stage-1-1_general, ..."""
    return f"stage-{k + 1}-{name}"


def stage_table(metrics_path, curriculum):
    """Each stage's val loss before SFT and after each stage: the curriculum's effect, stage by stage."""
    evals = {r["step"]: r for r in read_metrics(metrics_path) if any(k.startswith("val/") for k in r)}
    names = sorted({k[4:] for r in evals.values() for k in r if k.startswith("val/")})
    if not names:
        return ""
    points = [("before", 0)] + [(f"after {n}", first + steps) for n, first, steps in curriculum.stages]
    lines = ["", "| val loss (nats/token) | " + " | ".join(p for p, _ in points) + " |",
             "| --- |" + " --- |" * len(points)]
    for n in names:
        cells = [f"{evals[s][f'val/{n}']:.4f}" if s in evals and f"val/{n}" in evals[s] else "" for _, s in points]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    launch(run, get_args(argv))


if __name__ == "__main__":
    main()
