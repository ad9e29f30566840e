"""
KL logit distillation of a small draft model from the adapted target, so that speculative decoding accepts more of
the draft's tokens (SOAEsV2's "distillation-enhanced speculative decoding"; DistillSpec, Zhou et al. 2023).

    python distill.py --teacher out/telco-sft --student tiny --domain telco              # a new draft from a preset
    python distill.py --teacher out/telco-sft --student out/draft --domain telco --data student --loss tvd
    torchrun --nproc_per_node=2 distill.py --teacher out/telco-sft --student tiny --domain telco

The student learns the teacher's next-token distributions (not just its argmax) on one of DistillSpec's data
sources: --data text (the domain corpus), sft (the domain's SFT conversations, assistant turns), teacher
(continuations the teacher samples for domain prompts, generated once) or student (on-policy: the student's own
samples, regenerated every step, scored by the teacher). Speculative acceptance is 1 - TVD(p, q) per token
(Leviathan et al. 2023, Corollary 3.6), so --loss tvd optimises acceptance directly; fkl is Hinton's KD.
Before and after training it measures the student's acceptance rate alpha as the teacher's draft, along the
teacher's own continuations of held-out prompts.
The loop is train.py's, checkpoints, resume and the HF export checkpoint.py's, the sharded teacher
parallel.py's; speculative decoding is speculative.py's.
"""
import argparse
import copy
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import memory
from chat import add_chat_template_flag, render_chat, use_chat_template
from checkpoint import checkpoint_dirs, export_hf, finish, prepare_out, record_run, resume
from data import WindowSampler, pad_rows, read_conversations, read_jsonl, sft_files, sft_row
from draft_vocab import DRAFT_VOCAB, fit_vocab, frequent_vocab, prune_head
from files import write_atomic
from model import (IGNORE, PRESETS, Head, Transformer, check_tokenizer, loss_chunk_rows, preset_model, softcap,
                   to_dtype)
from parallel import (TensorParallelTeacher, check_batch_sizes, compute_dtype, gather, launch, load_teacher, log,
                      rank_share, setup_distributed, shard_model, tokenize_once)
from speculative import (check_same_tokenizer, cost_ratio, cut_at_eos, generate_batch, is_chat_model, predicted_speedup,
                         prompt_ids, stop_id, truncate)
from tokenizer import Tokenizer
from train import (COUNT, POSITIVE, add_training_flags, cosine_schedule, make_optimizer, number, parse_training_args,
                   step_of, train_loop)

LOSSES = ("fkl", "rkl", "jsd", "tvd")
SOURCES = ("text", "sft", "teacher", "student")


def data_mix(text):
    """--data: one of SOURCES, or several joined by '+' (each at most once)."""
    names = text.split("+")
    if any(n not in SOURCES for n in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(SOURCES)} or a mix such as teacher+student, "
                                         f"got {text!r}")
    return text


def listed(parse):
    """An argparse type: a comma-separated list of values, each read by parse."""
    return lambda text: [parse(t) for t in text.split(",")]


def distillation_loss(student_logits, teacher_logits, mask=None, kind="fkl", temperature=1.0):
    """Mean over unmasked positions of a divergence between the teacher's distribution p and the student's q,
    both softened by the temperature T:
      fkl  KL(p || q) * T^2   forward KL, Hinton et al. 2015 (T^2 keeps gradients comparable across T)
      rkl  KL(q || p)         reverse KL: mode-seeking, the student drops what it cannot fit
      jsd  (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2   (beta = 0.5)
      tvd  sum |p - q| / 2    total variation: speculative acceptance is 1 - TVD
    Logits [..., V]; a vocabulary padded past the other (Qwen pads to 64/128) is cut to the shared ids."""
    if kind not in LOSSES:
        raise ValueError(f"unknown distillation loss {kind!r}; choose from {', '.join(LOSSES)}")
    V = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = F.log_softmax(student_logits[..., :V].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[..., :V].float() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "fkl":
        per_token = (p * (log_p - log_q)).sum(-1) * temperature ** 2
    elif kind == "rkl":
        per_token = (q * (log_q - log_p)).sum(-1)
    elif kind == "jsd":
        log_m = torch.log((p + q) / 2).clamp(min=torch.finfo(torch.float32).min)
        per_token = ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1)) / 2
    else:
        per_token = (p - q).abs().sum(-1) / 2
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF directory of the target model (e.g. out/telco-sft)")
    p.add_argument("--student", default="tiny", help="HF directory of the draft, or a preset (" +
                   ", ".join(PRESETS) + ") for a new one on the teacher's tokenizer")
    p.add_argument("--student-layers", type=POSITIVE, help="with an HF --student: keep only its first N layers "
                   "(a truncated copy of the target is a draft that shares its embeddings and tokenizer)")
    p.add_argument("--data", default="teacher", type=data_mix,
                   help="what to distil on (DistillSpec): text (domain text), sft (SFT conversations), teacher "
                   "(teacher samples) or student (the student's own samples, on-policy); or a mix joined by '+', "
                   "e.g. teacher+student: step s draws its batch from the (s mod n)-th")
    p.add_argument("--loss", default="fkl", choices=LOSSES)
    p.add_argument("--temperature", type=number(float, 0, low_open=True), default=1.0,
                   help="softening of both distributions in the loss")
    p.add_argument("--alpha", type=number(float, 0, 1), default=0.0, help="weight of cross-entropy on the data's "
                   "tokens")
    p.add_argument("--gen-tokens", type=POSITIVE, default=64, help="teacher/student data: tokens generated per "
                   "prompt")
    p.add_argument("--gen-temperature", type=listed(number(float, 0)), default=[1.0], metavar="T[,T...]",
                   help="sampling temperature for generated data (0: greedy); a list, e.g. 0,1 (the temperatures "
                   "the draft will decode at): teacher data holds a continuation per prompt at each, student data "
                   "samples at each in turn")
    p.add_argument("--gen-batch-size", type=POSITIVE, default=16, help="teacher/student data: prompts sampled "
                   "together, in one forward pass per token")
    p.add_argument("--prompt-tokens", type=POSITIVE, default=32, help="base teachers: corpus prefix length as prompt")
    p.add_argument("--text-key", default="text", help="the key (column) of .jsonl / .parquet rows holding the text")
    p.add_argument("--accept-prompts", type=COUNT, default=12, help="held-out prompts for the acceptance rate")
    p.add_argument("--gamma", type=POSITIVE, default=4, help="draft tokens per round, for the acceptance measurement")
    p.add_argument("--draft-vocab", type=POSITIVE, metavar="K",
                   help="give the draft's head only the K tokens most frequent in the domain corpus (FR-Spec), plus "
                        "the stop tokens: a cheaper draft step; distilled on those K; the export lists them in "
                        f"{DRAFT_VOCAB} (default: the whole vocabulary)")
    p.add_argument("--replicate-teacher", action="store_true",
                   help="keep the whole teacher on every process instead of splitting it: more memory, no "
                        "collective in its forward passes")
    add_chat_template_flag(p, "a chat teacher's prompts (a teacher whose config.json stops at the template's "
                           "end-of-turn token)")
    add_training_flags(p, "out/<domain>-draft", domain="telco", data_root="data", out=None, batch_size=16,
                       micro_batch_size=8, seq_len=256, max_steps=60, lr=1e-3, min_lr=None, warmup_steps=5,
                       weight_decay=0.0, grad_clip=1.0, seed=1337, eval_every=20, save_every=20, keep_checkpoints=2,
                       resume=False, compile=False, dtype=None)
    args = parse_training_args(p, argv)
    if args.gen_tokens >= args.seq_len:
        p.error(f"--gen-tokens {args.gen_tokens} must be less than --seq-len {args.seq_len}: a training row holds "
                "the prompt and its continuation")
    return args


# -----------------------------------------------------------------------------
# The student (the teacher is parallel.load_teacher: split over the processes under torchrun)


def load_student(args, teacher, tokenizer, device):
    """The draft: a new model of a preset shape on the teacher's tokenizer, or an HF checkpoint that must share it."""
    if args.student in PRESETS:
        if args.student_layers:
            raise SystemExit(f"--student-layers: only for an HF --student, not the preset {args.student}")
        tc = teacher.config
        return preset_model(args.student, tc.vocab_size, tc.max_seq_len, tc.bos_token_id, tc.eos_token_id,
                            args.seed).to(device)
    if not os.path.isfile(os.path.join(args.student, "config.json")):
        raise SystemExit(f"--student {args.student}: neither a preset ({', '.join(PRESETS)}) nor an HF directory")
    check_same_tokenizer(tokenizer, Tokenizer.from_pretrained(args.student), f"teacher ({args.teacher})",
                         f"student ({args.student})")
    student = Transformer.from_pretrained(args.student, device=device, dtype=torch.float32)
    student.config.eos_token_id = teacher.config.eos_token_id  # stop where the teacher stops
    if args.student_layers:
        if args.student_layers > student.config.n_layers:
            raise SystemExit(f"--student-layers {args.student_layers}: {args.student} has only "
                             f"{student.config.n_layers} layers")
        # A truncated copy: the first layers, the final norm and the head. It starts on the teacher's embeddings
        # and early features, so distillation only has to teach the last layers' work to fewer of them.
        truncate(student, args.student_layers)
    return student


def draft_vocabulary(tokenizer, teacher, args):
    """--draft-vocab K: the K tokens most frequent in the domain's training corpus (FR-Spec ranks by corpus
    frequency), plus the teacher's stop tokens; (ids, the share of the corpus's tokens they cover)."""
    tokens = tokenize_once(tokenizer, args.data_root, args.domain, "train", args.text_key)
    counts = np.bincount(np.asarray(tokens), minlength=teacher.config.vocab_size)[:teacher.config.vocab_size]
    eos = teacher.config.eos_token_id
    kept = frequent_vocab(counts, args.draft_vocab, keep=(eos if isinstance(eos, list) else [eos]) +
                          [stop_id(teacher, tokenizer)])
    return kept, float(counts[kept].sum() / max(1, counts.sum()))


def pruned_copy(student, kept):
    """The draft as speculative decoding will run it: a copy whose head scores only the kept ids (or the student
    itself without --draft-vocab)."""
    if kept is None:
        return student
    return prune_head(copy.deepcopy(student), kept)


# -----------------------------------------------------------------------------
# Prompts and data: every source becomes rows of (ids, labels), labels IGNORE where nothing is distilled


def domain_prompts(tokenizer, teacher, args, split):
    """Prompts from the domain. For a chat teacher: the user turns of data/<domain>/sft/[val/]*.jsonl rendered with
    the assistant header; held out (split "val") without sft/val/, the questions of data/<domain>/eval/qa.jsonl
    (never trained on; speculative.py --bench decodes them). For a base teacher, or a chat teacher with neither:
    the first --prompt-tokens tokens of corpus windows."""
    chat = is_chat_model(teacher, tokenizer)
    try:
        files = sft_files(args.data_root, args.domain, split) if chat else []
    except ValueError:  # no conversations for this split
        files = []
    if files:
        prompts = []
        for path in files:
            for messages, _ in read_conversations(path):
                first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
                prompts.append(render_chat(tokenizer, messages[:first], add_generation_prompt=True)[0])
        return prompts
    qa = os.path.join(args.data_root, args.domain, "eval", "qa.jsonl")
    if chat and split == "val" and os.path.isfile(qa):
        return [prompt_ids(teacher, tokenizer, row["prompt"]) for _, row in read_jsonl(qa)
                if isinstance(row.get("prompt"), str)]
    tokens = tokenize_once(tokenizer, args.data_root, args.domain, split, args.text_key)
    n = (len(tokens) - 1) // args.seq_len
    return [tokens[i * args.seq_len:i * args.seq_len + args.prompt_tokens].tolist() for i in range(n)]


def seed_of(*key):
    """One 63-bit seed from a tuple of ints, e.g. (seed, prompt index): distinct keys give unrelated streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_rows(model, prompts, seeds, args, eos_id, dtype, temperature, batch_size=None):
    """(prompt + sampled continuation, labels on the continuation) per prompt, at temperature,
    --gen-batch-size (or batch_size) prompts per forward pass (generate_batch), each drawn from its own generator
    seeded by its seed (a seed None: greedy): a prompt's sample does not depend on the prompts batched with it.
    Fixed-length generation, cut at eos afterwards: every process runs the same number of forward passes, as FSDP's
    collectives need (a process with fewer prompts than the others samples its last one again, or a one-token
    prompt if it has none, and drops those rows)."""
    device = model.lm_head.weight.device
    n = len(prompts)
    most = max(gather([n]))
    # (a cache for the prompts there are, not for the flag)
    rows_at_once = max(1, min(batch_size or args.gen_batch_size, most))
    model.setup_cache(rows_at_once, min(args.seq_len, model.config.max_seq_len), dtype=dtype)
    prompts = [p[-(args.seq_len - args.gen_tokens):] for p in prompts + [(prompts or [[0]])[-1]] * (most - n)]
    seeds = seeds + [0] * (most - n)
    rows = []
    for b in range(0, most, rows_at_once):
        batch = prompts[b:b + rows_at_once]
        generators = [None if s is None else torch.Generator(device).manual_seed(s)
                      for s in seeds[b:b + rows_at_once]]
        news = generate_batch(model, batch, args.gen_tokens, temperature=temperature, generators=generators)
        rows += [continuation_row(p, cut_at_eos(new, eos_id)) for p, new in zip(batch, news)]
    return rows[:n]


def continuation_row(prompt, new):
    """(ids, labels) distilling only the generated tokens: the labels of the prompt's positions are IGNORE."""
    return prompt + new, [IGNORE] * (len(prompt) - 1) + new


# -----------------------------------------------------------------------------
# DistillSpec's data sources: each gives batch(step) -> the global batch, int64 [batch_size, 2, width] (ids, labels)


def text_source(tokenizer, args):
    """Domain text: every next token of corpus windows is distilled."""
    windows = WindowSampler(tokenize_once(tokenizer, args.data_root, args.domain, "train", args.text_key), args.seq_len,
                            args.seed)

    def batch(step):
        w = windows.take(step * args.batch_size, args.batch_size)
        return np.stack([w[:, :-1], w[:, 1:]], axis=1)
    return batch


def pool_source(pool, args, pad_id):
    """A fixed pool of rows (SFT conversations, teacher samples): step s draws a batch_size subset, seeded by
    (seed, s)."""
    def batch(step):
        pick = np.random.default_rng([args.seed, step]).choice(len(pool), args.batch_size,
                                                               replace=len(pool) < args.batch_size)
        return pad_rows([pool[i] for i in pick], pad_id)
    return batch


def sft_pool(tokenizer, args):
    """The domain's SFT conversations (every stage), distilled on the assistant turns."""
    try:
        files = sft_files(args.data_root, args.domain)
    except ValueError as e:
        raise SystemExit(f"--data sft: {e}") from None
    return [sft_row(tokenizer, m, args.seq_len, where)[:2] for f in files for m, where in read_conversations(f)]


def teacher_pool(teacher, tokenizer, args, eos, dtype, rank, world):
    """DistillSpec's teacher-generated data: a continuation of each domain prompt at each --gen-temperature,
    sampled once before training, prompt i at the k-th temperature under seed (seed, i[, k]), so a resumed run, or
    one with another number of processes, has the same pool."""
    prompts = domain_prompts(tokenizer, teacher, args, "train")
    temperatures = args.gen_temperature
    log(f"sampling {args.gen_tokens}-token teacher continuations of {len(prompts)} domain prompts at temperature "
        f"{', '.join(map(str, temperatures))}")
    # A teacher split by heads decodes the same rows on every process, each its heads of them: all the prompts.
    # Otherwise each process samples its share.
    same_rows = isinstance(teacher, TensorParallelTeacher)
    mine = list(enumerate(prompts)) if same_rows else rank_share(list(enumerate(prompts)), rank, world)
    pool = []
    for k, t in enumerate(temperatures):
        seeds = [seed_of(args.seed, i, *([k] if k else [])) for i, _ in mine]
        rows = sample_rows(teacher, [p for _, p in mine], seeds, args, eos, dtype, t)
        pool += rows if same_rows else gather(rows)
    log(f"teacher pool: {len(pool)} rows, fingerprint {pool_fingerprint(pool)}")
    return pool


def pool_fingerprint(pool):
    """A short hash of a pool of rows: two runs drew the same data exactly when it is equal."""
    return hashlib.sha256(json.dumps(pool).encode()).hexdigest()[:16]


def student_source(student, prompts, args, eos, dtype, pad_id, rank, world):
    """On-policy data (DistillSpec): the student's own samples for batch_size domain prompts, drawn again at every
    step it serves, at the --gen-temperature values in turn; each process samples its share, prompt j of step s
    under seed (seed, s, j)."""
    temperatures, turn = args.gen_temperature, len(args.data.split("+"))  # (in a mix it serves every turn-th step)

    def batch(step):
        pick = np.random.default_rng([args.seed, step]).choice(len(prompts), args.batch_size)
        mine = rank_share(list(enumerate(pick)), rank, world)
        rows = sample_rows(student, [prompts[i] for _, i in mine], [seed_of(args.seed, step, j) for j, _ in mine], args,
                           eos, dtype, temperatures[step // turn % len(temperatures)])
        return pad_rows(gather(rows), pad_id)
    return batch


def mixed(sources):
    """Several sources taken in turn (--data teacher+student): step s draws from the (s mod n)-th."""
    return lambda step: sources[step % len(sources)](step)


# -----------------------------------------------------------------------------
# Acceptance rate of the student as the teacher's draft


def held_out_paths(teacher, prompts, args, eos, dtype):
    """The teacher's own continuations of the held-out prompts, greedy and sampled at temperature 1 (prompt i
    under seed (seed, i)): {temperature: rows (ids, labels on the continuation)}. Generated once, all in one batch
    (a forward pass per token for both kinds; sample_rows), and shared by the acceptance before and after training
    (the teacher does not change) and the validation TVD. Every process generates all of them, so all hold the
    same rows."""
    n = len(prompts)
    rows = sample_rows(teacher, prompts * 2, [None] * n + [seed_of(args.seed, i) for i in range(n)], args, eos, dtype,
                       temperature=1.0, batch_size=2 * n)
    return {0.0: rows[:n], 1.0: rows[n:]}


@torch.no_grad()
def expected_acceptance(teacher, draft, rows, pad_id, greedy):
    """Leviathan et al.'s alpha (their Definition 3.1): the mean over the rows' continuation positions of beta,
    the chance that the draft's token there is accepted, sum_x min(p(x), q(x)) = 1 - TVD(p, q) with p the
    teacher's and q the draft's next-token distribution given the teacher's own prefix. Greedy (p and q one-hot):
    1 where the draft's argmax is the teacher's token (the row's label), and the teacher need not run. A draft with
    a reduced head (prune_head) has q = 0 outside its ids (draft_vocab.fit_vocab)."""
    device = teacher.lm_head.weight.device
    batch = torch.from_numpy(pad_rows(rows, pad_id)).to(device)
    x, y = batch[:, 0], batch[:, 1].flatten()
    positions = (y != IGNORE).nonzero().squeeze(1)
    h_draft = draft.hidden(x).flatten(0, 1)
    h_teacher = None if greedy else teacher.hidden(x).flatten(0, 1)
    V, ids = teacher.config.vocab_size, getattr(draft, "vocab_ids", None)
    total = 0.0
    # a chunk of positions at a time, as the loss (model.ChunkedLoss): never the logits of every position at once;
    # the same chunks on every process, whose rows are the same, for the sharded teacher's collective head
    for chunk in positions.tensor_split(-(-len(y) // loss_chunk_rows(V, distillation=True))):
        q_logits = fit_vocab(draft.lm_head(h_draft[chunk]), V, ids).float()
        if greedy:
            total += (q_logits.argmax(-1) == y[chunk]).sum().item()
        else:
            p = F.softmax(teacher.lm_head(h_teacher[chunk]).float(), dim=-1)
            total += torch.minimum(p, F.softmax(q_logits, dim=-1)).sum().item()
    return total / max(1, len(positions))


def acceptance(teacher, student, paths, args, pad_id):
    """The student as the teacher's draft: alpha greedy and at temperature 1 (expected_acceptance along the
    teacher's continuations `paths`), with the speedup Leviathan et al. predict from them and the measured cost
    ratio c. Scoring teacher-forced continuations takes one pass of each model over all prompts, where decoding
    speculatively takes a teacher pass per round per prompt: through a teacher sharded over processes, every pass
    gathers every block, and decoding then times the collectives, not the draft (c and the speedup are not
    measured there: None; speculative.py --bench decodes and times the pair)."""
    sharded = not args.replicate_teacher and dist.is_initialized() and dist.get_world_size() > 1
    c = None if sharded else cost_ratio(teacher, student)
    result = {"cost_ratio": c}
    for temperature, name in ((0.0, "greedy"), (1.0, "T=1")):
        a = expected_acceptance(teacher, student, paths[temperature], pad_id, greedy=temperature == 0)
        result[f"acceptance_{name}"] = a
        result[f"predicted_speedup_{name}"] = None if c is None else predicted_speedup(a, args.gamma, c)
    return result


def acceptance_line(when, r, gamma):
    line = f"{when}: acceptance rate greedy {r['acceptance_greedy']:.3f}, T=1 {r['acceptance_T=1']:.3f}; "
    if r["cost_ratio"] is None:
        return line + "speedup not predicted: the teacher is sharded, so decoding times its collectives"
    return line + (f"predicted speedup (gamma {gamma}, c {r['cost_ratio']:.3f}) {r['predicted_speedup_greedy']:.2f}x "
                   f"greedy, {r['predicted_speedup_T=1']:.2f}x at T=1")


def record_acceptance(out, when, result, rank):
    """<out>/acceptance.json: {"before": ..., "after": ...}, what distillation added (the undistilled draft's
    acceptance and predicted speedup beside the distilled one's; report.py reads it)."""
    if rank == 0:
        path = os.path.join(out, "acceptance.json")
        done = json.loads(open(path).read()) if os.path.exists(path) else {}
        write_atomic(path, json.dumps({**done, when: result}, indent=2) + "\n")


def distilled(student, teacher, batch, kind, temperature=1.0, alpha=0.0, kept=None):
    """The distillation loss summed over the positions of a [B, 2, T] (ids, labels) batch that have a label, plus
    alpha x the cross-entropy on the labels. A chunk of positions at a time: the teacher's final hidden states go
    through its head chunk by chunk beside the student's (model.ChunkedLoss), so neither model's logits of the
    whole batch exist at once. kept (a reduced draft vocabulary): both distributions over those ids alone, each
    renormalised there, since the draft will never propose another (EAGLE-3 trains its reduced head so). Without
    alpha, on one process, both heads then compute only the kept rows' logits: Gemma-3's 262,144-token head would
    otherwise be most of a step, for 4,096 logits used."""
    x, labels = batch[:, 0], batch[:, 1]
    with torch.no_grad():
        teacher_hidden = teacher.hidden(x).flatten(0, 1)
    y = labels.flatten()
    reduced = kept is not None and not alpha and all(type(m.lm_head) is Head for m in (student, teacher))
    vocab = torch.tensor(kept, device=x.device) if reduced else None
    if vocab is None:
        head = teacher.lm_head
    else:  # the teacher's head over the kept rows, gathered once for every chunk
        kept_rows = teacher.lm_head.weight[vocab]

        def head(h):
            return softcap(F.linear(h, kept_rows), teacher.lm_head.cap)

    def chunk_loss(logits, rows):
        with torch.no_grad():
            teacher_logits = head(teacher_hidden[rows])
        everywhere = torch.ones(len(rows), device=logits.device)  # (a chunk may be empty: its sum is 0, not NaN)
        if kept is None or reduced:
            loss = distillation_loss(logits, teacher_logits, everywhere, kind, temperature)
        else:
            loss = distillation_loss(logits[:, kept], teacher_logits[:, kept], everywhere, kind, temperature)
        loss = loss * len(rows)
        if alpha:
            loss = (1 - alpha) * loss + alpha * F.cross_entropy(logits.float(), y[rows], reduction="sum")
        return loss
    return student.loss(x, labels, loss_fn=chunk_loss, vocab=vocab)


# -----------------------------------------------------------------------------
# The run


def run(args):
    rank, world, device = setup_distributed()
    check_batch_sizes(args, world)
    out = args.out or os.path.join("out", f"{args.domain}-draft")
    if not os.path.isfile(os.path.join(args.teacher, "config.json")):
        raise SystemExit(f"--teacher {args.teacher}: not an HF model directory")
    dtype = compute_dtype(args.dtype, device)
    tokenizer = Tokenizer.from_pretrained(args.teacher)
    args.chat_template_sha256 = use_chat_template(tokenizer, args.chat_template)  # run.json: --resume keeps it
    prepare_out(out, args, {"teacher": args.teacher, "student": args.student},
                free={"accept_prompts", "replicate_teacher"})
    fresh = not checkpoint_dirs(out)
    with memory.stage(out, "load", device):  # (the teacher, then the student)
        with memory.stage(out, "load teacher", device):
            teacher = load_teacher(args.teacher, device, dtype, args.replicate_teacher)
        student = load_student(args, teacher, tokenizer, device)
    check_tokenizer(tokenizer, teacher.config, args.teacher)
    if args.seq_len > min(teacher.config.max_seq_len, student.config.max_seq_len):
        raise SystemExit(f"--seq-len {args.seq_len} exceeds a model's context")
    record_run(out, args)
    kept = None
    if args.draft_vocab:
        kept, coverage = draft_vocabulary(tokenizer, teacher, args)
        log(f"draft vocabulary: {len(kept):,} of {teacher.config.vocab_size:,} tokens (--draft-vocab "
            f"{args.draft_vocab} + stop tokens), {coverage:.1%} of the {args.domain} corpus's tokens")
    eos = stop_id(teacher, tokenizer)
    pad_id = tokenizer.eos_id or 0
    held_out = domain_prompts(tokenizer, teacher, args, "val")[:args.accept_prompts]
    paths = None
    if held_out:  # (on every process: the sharded teacher's forward passes are collectives)
        with memory.stage(out, "teacher's held-out paths", device):
            paths = held_out_paths(teacher, held_out, args, eos, dtype)
    else:
        log("--accept-prompts 0 (or no held-out prompts): the acceptance rate is not measured")
    if fresh and held_out:
        with memory.stage(out, "acceptance before", device):
            before = acceptance(teacher, pruned_copy(student, kept), paths, args, pad_id)
        log(acceptance_line("before distillation", before, args.gamma))
        record_acceptance(out, "before", before, rank)
    model = shard_model(student, device, dtype, compile=args.compile)
    model.loss_chunk_rows = loss_chunk_rows(student.config.vocab_size, distillation=True)  # (see model.py)
    optimizer = make_optimizer(model, args.weight_decay, device)

    # The data (DistillSpec's four sources, or a mix of them taken in turn)
    sources = []
    for name in args.data.split("+"):
        if name == "text":
            sources.append(text_source(tokenizer, args))
        elif name == "sft":
            sources.append(pool_source(sft_pool(tokenizer, args), args, pad_id))
        elif name == "teacher":
            with memory.stage(out, "teacher samples", device):
                pool = teacher_pool(teacher, tokenizer, args, eos, dtype, rank, world)
            sources.append(pool_source(pool, args, pad_id))
        else:
            sources.append(student_source(model, domain_prompts(tokenizer, teacher, args, "train"), args, eos, dtype,
                                          pad_id, rank, world))
    source = mixed(sources)

    def get_step(step):
        return step_of(torch.from_numpy(source(step)).to(device), args.micro_batch_size, student.config)

    def loss_fn(model, batch):
        """Summed over the distilled tokens (train_loop divides by their global count)."""
        return distilled(model, teacher, batch, args.loss, args.temperature, args.alpha, kept)

    def evaluate_fn():
        """Mean TVD to the teacher on held-out prompts' teacher greedy continuations (1 - TVD: the expected
        acceptance of a draft token)."""
        batch = torch.from_numpy(pad_rows(paths[0.0], pad_id)).to(device)
        with torch.no_grad():
            tvd = distilled(model, teacher, batch, "tvd", kept=kept).item() / int((batch[:, 1] != IGNORE).sum())
        return {f"tvd/{args.domain}": tvd}

    start_step = resume(model, optimizer, out) if args.resume else 0
    if fresh:
        log(f"distilling {args.teacher} ({teacher.config.num_params() / 1e6:.1f}M) into a "
            f"{student.config.num_params() / 1e6:.1f}M student ({args.student}): {args.loss} loss on "
            f"{args.data} data, {args.max_steps} steps of {args.batch_size} sequences")
    train_loop(model, optimizer, get_step, loss_fn, cosine_schedule(args), out, start_step=start_step,
               evaluate_fn=evaluate_fn if held_out else None, device=device)
    with memory.stage(out, "export", device):
        export_hf(model, student.config, tokenizer, out, to_dtype(student.config.dtype))  # (a preset's: fp32)
    if kept is not None and rank == 0:  # (speculative.load_draft prunes the head to these)
        write_atomic(os.path.join(out, DRAFT_VOCAB), json.dumps({"ids": kept, "draft_vocab": args.draft_vocab,
                                                                  "coverage": round(coverage, 6)}) + "\n")
    if held_out:
        with memory.stage(out, "acceptance after", device):
            draft = pruned_copy(Transformer.from_pretrained(out, device=device).eval(), kept)
            after = acceptance(teacher, draft, paths, args, pad_id)
        log(acceptance_line("after distillation", after, args.gamma))
        record_acceptance(out, "after", after, rank)
    memory.record_run_peak(out, device)
    log(memory.table(out))
    finish(out)
    return out


def main(argv=None):
    launch(run, get_args(argv))


if __name__ == "__main__":
    main()
