"""Evaluate every stage side by side: does the model know the domain now, and has it kept its general ability?

    python eval.py out/base out/telco out/telco-sft --domain telco
    python eval.py out/base out/telco out/telco-sft --domain telco --draft out/telco-draft    # speculative QA

For each model (an HF directory), on the domain and on the general corpus:
  - bits per byte and perplexity on data/<d>/val (bpb is tokenizer-independent: models with different tokenizers
    compare fairly);
  - multiple choice from data/<d>/eval/mcq.jsonl, scored as lm-eval-harness scores it: acc and acc_norm;
  - greedy answers to data/<d>/eval/qa.jsonl (chat-rendered for chat models), scored with ROUGE-1 and BLEU-4,
    as SOAEsV2 reports them.
The first model is the baseline for general retention: a later model's general score over the baseline's (the
number SOAEsV2 reports as 99.8 %). One markdown table, also saved as JSON.
"""
import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from chat import add_chat_template_flag, check_messages, render_chat, use_chat_template
from data import corpus_files, read_jsonl, tokenize_corpus
from files import check_writable, write_atomic
from speculative import (check_same_tokenizer, decode_dtype, ensure_cache, generate_batch, is_chat_model, load,
                         load_draft, pooled_stats, prompt_ids, speculative_generate, stop_id)
from train import POSITIVE, retention, val_loss_and_bpb

# -----------------------------------------------------------------------------
# BLEU-4 (Papineni et al. 2002), as sacrebleu computes corpus BLEU with its defaults


def tokenize_13a(line):
    """sacrebleu's default "13a" tokenizer (mteval-v13a.pl): split off punctuation and symbols, periods and commas
    unless inside a number, and a dash after a digit."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", f" {line} ")
    line = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", line)
    line = re.sub(r"([\.,])([^0-9])", r" \1 \2", line)
    line = re.sub(r"([0-9])(-)", r"\1 \2 ", line)
    return line.split()


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hyps, refs):
    """Corpus BLEU-4 in 0..100 with one reference per hypothesis: clipped n-gram matches and n-gram counts summed
    over the corpus, geometric mean of the four precisions, brevity penalty exp(1 - r/c) when the output is
    shorter than the references. A zero precision is smoothed as in mteval ("exp"): the k-th zero counts as
    1 / (2^k * total). Equals sacrebleu.corpus_bleu(hyps, [refs]).score."""
    if len(hyps) != len(refs):
        raise ValueError(f"bleu4: {len(hyps)} hypotheses but {len(refs)} references")
    stats = [0] * 10
    for hyp, ref in zip(hyps, refs):
        stats = [a + b for a, b in zip(stats, bleu_stats(hyp, ref))]
    return bleu_from_stats(stats)


def bleu_stats(hyp, ref):
    """One answer's share of corpus BLEU, which sums these over the corpus before combining them: [answer length,
    reference length, clipped matches of 1..4-grams, 1..4-grams in the answer]."""
    h, r = tokenize_13a(hyp.rstrip()), tokenize_13a(ref.rstrip())
    correct = [sum(min(c, ngrams(r, n)[g]) for g, c in ngrams(h, n).items()) for n in range(1, 5)]
    return [len(h), len(r), *correct, *(max(len(h) - n + 1, 0) for n in range(1, 5))]


def bleu_from_stats(stats):
    """Corpus BLEU-4 from bleu_stats summed over the answers."""
    sys_len, ref_len, correct, total = stats[0], stats[1], stats[2:6], stats[6:10]
    if not any(correct):
        return 0.0
    brevity = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    log_precision, zeros = 0.0, 0
    for c, t in zip(correct, total):
        if t == 0:  # no n-grams this long at all: sacrebleu stops adding precisions, leaving log(0)
            return 0.0
        if c == 0:
            zeros += 1
            log_precision += math.log(100.0 / (2 ** zeros * t))
        else:
            log_precision += math.log(100.0 * c / t)
    return brevity * math.exp(log_precision / 4)


# -----------------------------------------------------------------------------
# ROUGE-1 (Lin 2004), as rouge_score computes it without stemming, plus CJK

# CJK ideographs, kana and Hangul: each character is a token, as Chinese and Korean ROUGE implementations count them
# (rouge_score keeps only [a-z0-9] runs, so it would score such text as empty)
CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
ROUGE_TOKEN = re.compile(rf"[a-z0-9]+|[{CJK}]")


def rouge_tokens(text):
    """rouge_score's tokenizer: lowercase, runs of [a-z0-9] (everything else separates); and CJK characters."""
    return ROUGE_TOKEN.findall(text.lower())


def rouge1(hyps, refs):
    """Mean ROUGE-1 F1 in 0..100: unigram overlap (clipped counts) between each hypothesis and its reference,
    F1 of precision overlap/|hyp| and recall overlap/|ref|."""
    if len(hyps) != len(refs):
        raise ValueError(f"rouge1: {len(hyps)} hypotheses but {len(refs)} references")
    scores = []
    for hyp, ref in zip(hyps, refs):
        h, r = Counter(rouge_tokens(hyp)), Counter(rouge_tokens(ref))
        overlap = sum((h & r).values())
        precision, recall = overlap / max(sum(h.values()), 1), overlap / max(sum(r.values()), 1)
        scores.append(2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)
    return 100.0 * sum(scores) / max(len(scores), 1)


# -----------------------------------------------------------------------------
# Eval files


def read_eval_file(path, check):
    """Rows of a .jsonl eval file; check(row) returns what is wrong with a row, or None. Errors name file:line."""
    rows = []
    for where, row in read_jsonl(path):
        problem = check(row)
        if problem:
            raise ValueError(f"{where}: {problem}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def check_mcq(row):
    if not isinstance(row.get("question"), str):
        return 'expected {"question": <string>, "choices": [<string>, ...], "answer": <index>}'
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return '"choices" must be a list of at least 2 non-empty strings'
    if type(row.get("answer")) is not int or not 0 <= row["answer"] < len(choices):  # (true is an int in Python)
        return f'"answer" must be an index into the {len(choices)} choices, got {row.get("answer")!r}'


def check_qa(row):
    if not isinstance(row.get("reference"), str):
        return 'expected {"prompt": <string> or "messages": [...], "reference": <string>}'
    if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
        return 'expected a "prompt" string or a "messages" list'
    if "messages" in row:
        try:
            check_messages(row["messages"])
        except ValueError as e:
            return str(e)
        if not any(m["role"] == "user" for m in row["messages"]):
            return '"messages" has no user turn: nothing to answer'


# -----------------------------------------------------------------------------
# Multiple choice, the lm-eval-harness way


def encode_pair(tokenizer, context, continuation):
    """lm-eval's split: trailing spaces of the context move to the continuation, the whole string is encoded, and
    the continuation is what follows the context's own encoding (so BPE merges are those of the full text)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    if not ctx:  # lm-eval conditions an empty context on the end-of-text token
        return [tokenizer.eos_id], whole
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, pairs, batch_size=16):
    """log P(continuation | context) for each (context ids, continuation ids) pair, contexts cut from the left to
    the model's context length as lm-eval does. The choices of one question share its context, so the context
    goes through the model once, into the KV cache, and each choice's tokens then read it (lm-eval runs the whole
    question once per choice, 2.5-4x the tokens here). batch_size contexts at a time, left-padded as in
    speculative.generate_batch; each context's last hidden state predicts its choices' first token."""
    device, max_len = model.lm_head.weight.device, model.config.max_seq_len
    groups = {}  # context -> the pairs that continue it (a pair too long for the model: its own, cut context)
    for i, (ctx, cont) in enumerate(pairs):
        cut = max(0, len(ctx) + len(cont) - 1 - max_len)
        groups.setdefault(tuple((ctx + cont)[cut:len(ctx)] if cut else ctx), []).append(i)
    batches = []  # [contexts, their choices' widest input]: longest contexts first (similar lengths together: little
    # padding), a batch's longest context and widest choice within the model's context length
    for c in sorted(groups, key=len, reverse=True):
        width = max(len(pairs[i][1]) for i in groups[c]) - 1
        last = batches[-1] if batches else None
        if last and len(last[0]) < batch_size and len(last[0][0]) + max(last[1], width) <= max_len:
            last[0].append(c)
            last[1] = max(last[1], width)
        else:
            batches.append([[c], width])
    results = [0.0] * len(pairs)
    for batch, width in batches:
        members = [i for c in batch for i in groups[c]]
        rep = torch.tensor([k for k, c in enumerate(batch) for _ in groups[c]], device=device)
        conts = [pairs[i][1] for i in members]
        # 1. the contexts, left-padded to one width W, into the cache: their last position predicts a choice's first
        W = len(batch[0])
        ensure_cache(model, W + width, len(members))
        pad = torch.tensor([W - len(c) for c in batch], device=device)
        x = torch.tensor([[0] * (W - len(c)) + list(c) for c in batch], device=device)
        unpadded = torch.arange(model.max_seq_len, device=device)[None] >= pad[:, None] if pad.any() else None
        h = [model.hidden(x, torch.arange(W, device=device), unpadded)[rep, -1:]]
        # 2. each choice's own row: its context's cache columns copied, then its tokens but the last after them
        if width:
            for block in model.model.layers:
                cache = block.self_attn.kv_cache
                cache.k[:len(rep), :, :W], cache.v[:len(rep), :, :W] = cache.k[rep, :, :W], cache.v[rep, :, :W]
            x = torch.tensor([c[:-1] + [0] * (width + 1 - len(c)) for c in conts], device=device)
            h.append(model.hidden(x, torch.arange(W, W + width, device=device),
                                  None if unpadded is None else unpadded[rep]))
        h = torch.cat(h, dim=1)  # [choices, 1 + width, dim]: row r's position j predicts its token j
        where = [(r, j) for r, c in enumerate(conts) for j in range(len(c))]
        row, pos = torch.tensor(where, device=device).T
        # the output layer only where a choice's token is predicted (Gemma-3's is 262,144 wide)
        logprobs = F.log_softmax(model.lm_head(h[row, pos]).float(), dim=-1)
        target = torch.tensor([t for c in conts for t in c], device=device)
        picked = logprobs[torch.arange(len(target), device=device), target]
        for i, own in zip(members, picked.split([len(c) for c in conts])):
            results[i] = own.sum().item()
    return results


def multiple_choice(model, tokenizer, rows, batch_size=16, source="mcq.jsonl"):
    """acc: the choice with the highest log-likelihood of " " + choice after the question is the answer; acc_norm:
    the same with each log-likelihood divided by the choice's length in characters (lm-eval's acc_norm). A choice
    longer than the model's context cannot be scored: an error naming its question."""
    pairs = [encode_pair(tokenizer, r["question"], " " + c) for r in rows for c in r["choices"]]
    lengths = iter(len(cont) for _, cont in pairs)
    for i, r in enumerate(rows):
        for k, n in enumerate(next(lengths) for _ in r["choices"]):
            if n > model.config.max_seq_len:
                raise ValueError(f"{source}: question {i + 1}, choice {k + 1} is {n} tokens, longer than the "
                                 f"model's context of {model.config.max_seq_len} tokens")
    scores = iter(loglikelihoods(model, pairs, batch_size))
    acc = acc_norm = 0
    for r in rows:
        ll = [next(scores) for _ in r["choices"]]
        acc += max(range(len(ll)), key=lambda i: ll[i]) == r["answer"]
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(r["choices"][i])) == r["answer"]
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}


# -----------------------------------------------------------------------------
# Generation: greedy answers, ROUGE-1 and BLEU-4


def qa_prompt(model, tokenizer, row):
    """Chat models get the conversation chat-rendered; base models a plain "Question: ...\\nAnswer:" prompt."""
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    if is_chat_model(model, tokenizer):
        return render_chat(tokenizer, messages, add_generation_prompt=True)[0]
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return prompt_ids(model, tokenizer, f"Question: {question}\nAnswer:", chat=False)


def answer_text(model, tokenizer, ids):
    """Decoded answer. A base model does not know when to stop: its answer ends at the first line break."""
    eos = stop_id(model, tokenizer)
    text = tokenizer.decode([t for t in ids if t != eos])
    return text.strip() if is_chat_model(model, tokenizer) else text.strip().split("\n")[0].strip()


def answer_budgets(prompts, max_new_tokens, context, source, reserve=0):
    """Each question's own number of new tokens: max_new_tokens, or what its prompt leaves of the context (less
    `reserve`, speculative decoding's look-ahead). A prompt that leaves no room is an error naming its row."""
    budgets = [min(max_new_tokens, context - len(p) - reserve) for p in prompts]
    for i, (p, b) in enumerate(zip(prompts, budgets)):
        if b < 1:
            raise ValueError(f"{source}: question {i + 1} is {len(p)} tokens once rendered, which leaves no room "
                             f"for an answer in the model's context of {context} tokens")
    return budgets


def qa(model, tokenizer, rows, max_new_tokens, draft=None, gamma=4, desc="qa", batch_size=16, source="qa.jsonl"):
    """Greedy answers scored against the references. Without a draft, batch_size questions are answered in one
    forward pass per token (generate_batch; questions of similar length together, so little padding, and only
    questions with the same token budget together, so a long question never shortens the others' answers); with
    one, by speculative decoding one at a time (the same text, faster at batch 1)."""
    eos = stop_id(model, tokenizer)
    prompts = [qa_prompt(model, tokenizer, row) for row in rows]
    context = model.config.max_seq_len
    new, runs = [None] * len(rows), []
    if draft is None:
        budgets = answer_budgets(prompts, max_new_tokens, context, source)
        order = sorted(range(len(rows)), key=lambda i: (-budgets[i], len(prompts[i])))
        batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
        batches = [[i for i in batch if budgets[i] == b] for batch in batches for b in dict.fromkeys(
            budgets[i] for i in batch)]  # (a batch of mixed budgets is split: each row keeps its own)
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            answers = generate_batch(model, [prompts[i] for i in batch], budgets[batch[0]], eos_id=eos)
            for i, answer in zip(batch, answers):
                new[i] = answer
    else:
        budgets = answer_budgets(prompts, max_new_tokens, context, source, reserve=gamma + 1)
        for i, ids in enumerate(tqdm(prompts, desc=desc, unit="q", leave=False)):
            new[i], stats = speculative_generate(model, draft, ids, budgets[i], gamma=gamma, eos_id=eos)
            runs.append(stats)
    hyps = [answer_text(model, tokenizer, ids) for ids in new]
    refs = [r["reference"] for r in rows]
    result = {"rouge1": rouge1(hyps, refs), "bleu4": bleu4(hyps, refs)}
    if runs:
        result["acceptance_rate"] = pooled_stats(runs, gamma)["acceptance_rate"]
    return result, hyps


# -----------------------------------------------------------------------------
# One model, then the side-by-side report


def eval_model(path, args, tasks, draft=None):
    """Every metric of one model: {"bpb/<d>": ..., "ppl/<d>": ..., "mcq_acc_norm/<d>": ..., ...}."""
    device = torch.device(args.device)
    model, tokenizer = load(path, device, args.dtype)
    use_chat_template(tokenizer, args.chat_template)
    if draft is not None:
        check_same_tokenizer(tokenizer, draft[1], a_name=f"model {path}", b_name=f"--draft {args.draft}")
    metrics, answers = {}, {}
    val = {d: tokenize_corpus(tokenizer, args.data_root, d, "val", args.text_key) for d in tasks} \
        if "bpb" in args.tasks else {}
    for key, value in val_loss_and_bpb(model, val, min(args.seq_len, model.config.max_seq_len), args.batch_size,
                                       tokenizer.token_byte_lengths(), device, max_windows=10 ** 9).items():
        kind, d = key.split("/")
        if kind == "bpb":
            metrics[f"bpb/{d}"] = value
        else:
            metrics[f"ppl/{d}"] = math.exp(value)  # per token: depends on the tokenizer, unlike bpb
    for d, files in tasks.items():
        if "mcq" in files and "mcq" in args.tasks:
            source = os.path.join(args.data_root, d, "eval", "mcq.jsonl")
            for k, v in multiple_choice(model, tokenizer, files["mcq"], args.batch_size, source).items():
                metrics[f"mcq_{k}/{d}"] = v
        if "qa" in files and "qa" in args.tasks:
            result, hyps = qa(model, tokenizer, files["qa"], args.max_new_tokens, draft and draft[0], args.gamma,
                              desc=f"{Path(path).name} qa/{d}", batch_size=args.qa_batch_size,
                              source=os.path.join(args.data_root, d, "eval", "qa.jsonl"))
            metrics.update({f"{k}/{d}": v for k, v in result.items()})
            answers[d] = hyps
    return metrics, answers


def load_tasks(args):
    """{domain: {"mcq": rows, "qa": rows}} for --domain and --general; the domain must have eval files."""
    tasks = {}
    for d in dict.fromkeys([args.domain, *args.general]):
        corpus_files(args.data_root, d, "val")  # a clear error for an unknown domain or a missing val split
        folder = Path(args.data_root) / d / "eval"
        found = {name: folder / f"{name}.jsonl" for name in ("mcq", "qa") if (folder / f"{name}.jsonl").is_file()}
        if d == args.domain and not found:
            raise FileNotFoundError(f"{folder}/: no mcq.jsonl or qa.jsonl (the README shows their rows)")
        tasks[d] = {name: read_eval_file(str(path), check_mcq if name == "mcq" else check_qa)[:args.limit]
                    for name, path in found.items()}
    return tasks


LABELS = {"bpb": "bpb (lower is better)", "ppl": "perplexity / token", "mcq_acc": "MCQ acc",
          "mcq_acc_norm": "MCQ acc_norm", "rouge1": "ROUGE-1", "bleu4": "BLEU-4",
          "acceptance_rate": "draft acceptance rate", "retention_bpb": "general retention, bpb",
          "retention_mcq": "general retention, MCQ acc_norm"}


def add_retention(results, general):
    """Retention of general ability relative to the first model: its general bpb over the model's (lower bpb is
    better) and the model's general acc_norm over its. 100 %: nothing forgotten."""
    base = next(iter(results.values()))
    for m in results.values():
        if f"bpb/{general}" in base:
            m[f"retention_bpb/{general}"] = retention(base[f"bpb/{general}"], m[f"bpb/{general}"], True)
        if base.get(f"mcq_acc_norm/{general}"):
            m[f"retention_mcq/{general}"] = retention(base[f"mcq_acc_norm/{general}"], m[f"mcq_acc_norm/{general}"],
                                                      False)


def markdown_table(results, domains):
    names = list(results)
    keys = list(dict.fromkeys(k for m in results.values() for k in m))
    keys.sort(key=lambda k: (domains.index(k.split("/")[1]), list(LABELS).index(k.split("/")[0])))
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key in keys:
        kind, d = key.split("/")
        cells = []
        for n in names:
            v = results[n].get(key)
            cells.append("" if v is None else f"{v:.2%}" if kind.startswith(("retention", "mcq", "acceptance"))
                         else f"{v:.4f}" if kind == "bpb" else f"{v:.2f}")
        lines.append(f"| {d}: {LABELS[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TASKS = ("bpb", "mcq", "qa")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", help="HF directories; the first is the baseline for retention")
    p.add_argument("--domain", required=True, help="the domain: data/<domain>/val and data/<domain>/eval/")
    p.add_argument("--general", default=["general"], type=lambda s: [d for d in s.split(",") if d],
                   help="the general corpora whose retention is measured, comma-separated: general,heldout gives "
                        "the replay corpus's own writing beside text and questions kept apart from it")
    p.add_argument("--data-root", default="data")
    p.add_argument("--text-key", default="text", help="the key (column) of .jsonl / .parquet rows holding the text")
    p.add_argument("--draft", help="HF directory of a draft model: QA answers by speculative decoding")
    p.add_argument("--gamma", type=POSITIVE, default=4)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=96)
    p.add_argument("--limit", type=POSITIVE, help="score only the first N rows of each eval file (quick runs)")
    p.add_argument("--seq-len", type=POSITIVE, default=512, help="window for bpb")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="windows (bpb) or questions (MCQ) per forward pass")
    p.add_argument("--qa-batch-size", type=POSITIVE, default=64,
                   help="QA questions answered together (64: 1.8x the answers per second of 16 in float32 on a "
                        "2-core CPU, the same answers)")
    p.add_argument("--tasks", default="bpb,mcq,qa", help="comma-separated: any of " + ", ".join(TASKS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="weights and compute (default: bfloat16 on GPU, the checkpoint's own dtype on CPU)")
    p.add_argument("--out", help="report prefix: writes <out>.md and <out>.json (default: out/eval-<domain>)")
    add_chat_template_flag(p, "the QA prompts of every chat model (one whose config.json stops at the template's "
                           "end-of-turn token; base models get plain prompts)",
                           exports=False)
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if not args.tasks or set(args.tasks) - set(TASKS):
        p.error(f"--tasks {','.join(args.tasks)}: expected a comma-separated list of {', '.join(TASKS)}")
    twice = [m for m in dict.fromkeys(args.models) if args.models.count(m) > 1]
    if twice:
        p.error(f"{twice[0]} is listed twice: each model is one column of the report")
    args.dtype = decode_dtype(args.dtype, args.device)
    return args


def main(argv=None):
    args = get_args(argv)
    out = args.out or os.path.join("out", f"eval-{args.domain}")
    paths = [Path(f"{out}.md"), Path(f"{out}.json")]  # --out as given: "o/r-0.25" is not cut at its dot
    try:
        check_writable(paths[0].parent, "--out")  # before the work, not after it
        tasks = load_tasks(args)
        for path in args.models + ([args.draft] if args.draft else []):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"{path}: not an HF model directory (no config.json)")
        draft = load_draft(args.draft, torch.device(args.device), args.dtype) if args.draft else None
        results, answers = {}, {}
        for path in tqdm(args.models, desc="models", unit="model"):
            results[path], answers[path] = eval_model(path, args, tasks, draft)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for general in args.general:
        add_retention(results, general)
    table = markdown_table(results, list(tasks))
    print(table)
    # the .json that report.py reads first, the .md last: a report whose .md exists is complete
    try:
        questions = {d: len(files["mcq"]) for d, files in tasks.items() if "mcq" in files}  # MCQs scored
        write_atomic(paths[1], json.dumps({"metrics": results, "answers": answers, "questions": questions},
                                          indent=2, ensure_ascii=False) + "\n")
        write_atomic(paths[0], table + "\n")
    except OSError as e:  # a full disk: the temporary file is gone, the earlier report intact
        raise SystemExit(f"error: writing {out}: {e.strerror}") from None
    print(f"\nwritten: {paths[0]}, {paths[1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
