"""The papers' headline results beside ours: one table from the real-model track's outputs.

    TARGET=models/smollm2-135m-instruct bash workshop.sh          # the track; its last stage runs this
    python report.py out/real --domain telco                       # again, after the ablations of workshop.sh

Reads what the stages wrote under <out>: eval-<domain>.json (base, DACP, DACP + SFT), speculative-<domain>.json,
<domain>-draft/acceptance.json (the draft before and after distillation), stage-times.txt, and each ablation's
output once it has run (ABLATION=... in workshop.sh). A row whose ablation has not run names the command that
fills it. Writes <out>/paper-vs-ours.md and .json.

Every number carries its noise: an accuracy over n questions has a standard error of sqrt(p (1 - p) / n) (one
question is worth 100 / n points), and a ROUGE-1 difference between two models on the same questions the standard
error of its per-question differences.
"""
import argparse
import json
import math
import os
import sys

from data import read_jsonl
from eval import rouge1
from files import read_json, write_atomic

# The papers' figures, as the issue that asked for this table quotes them.
PAPER = {
    "retention": "SOAEsV2: 99.8 % of general ability retained",
    "domain": "ixi-GEN: telco benchmarks up, general kept",
    "replay": "ixi-GEN Fig. 3: more replay forgets less and learns the domain less; 50 % chosen",
    "sft_alone": "SOAEsV2: ROUGE-1 x1.08, BLEU-4 x1.17",
    "curriculum": "SOAEsV2: ROUGE-1 x1.02, BLEU-4 x1.06",
    "speculative": "SOAEsV2: 1.39-1.52x",
    "distillation": "DistillSpec: 10-45 % faster than the undistilled draft",
}


def metrics_by_stage(report, names):
    """{name: metrics} of an eval.py report whose models were given in the order of `names`."""
    return dict(zip(names, report["metrics"].values())) if report else {}


def pct(x):
    return f"{100 * x:.1f} %"


def accuracy(p, n):
    """An accuracy with its standard error over n questions."""
    return f"{100 * p:.1f} % (± {100 * math.sqrt(p * (1 - p) / n):.1f})"


def ratio(a, b):
    return f"x{a / b:.2f}" if b else "n/a"


def paired_rouge1(hyps_a, hyps_b, refs):
    """ROUGE-1 of a minus b with its standard error, paired over the same questions: the mean of the per-question
    F1 differences and their standard deviation over sqrt(n)."""
    d = [rouge1([a], [r]) - rouge1([b], [r]) for a, b, r in zip(hyps_a, hyps_b, refs)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1))
    return f"difference {mean:+.2f} ± {sd / math.sqrt(len(d)):.2f} (paired over {len(d)} questions)"


def answers_of(report, index, domain):
    """The QA answers of the index-th model of an eval.py report."""
    return list(report["answers"].values())[index][domain]


def rows(out, domain, n_items, refs):
    """[(key, result, ours, command)] for the table, in the issue's order."""
    track = f"TARGET=<checkpoint> OUT={out} bash workshop.sh"
    ablation = f"TARGET=<checkpoint> OUT={out} ABLATION={{}} bash workshop.sh"
    track_report = read_json(os.path.join(out, f"eval-{domain}.json"))
    if track_report is None:
        raise ValueError(f"{out}: no eval-{domain}.json, so the track has not run there ({track})")
    n_items = {**n_items, **track_report.get("questions", {})}  # what eval.py scored (--limit: fewer)
    stages = metrics_by_stage(track_report, ("base", "dacp", "sft"))
    base, dacp, sft = (stages.get(k, {}) for k in ("base", "dacp", "sft"))
    table = []

    def change(key, show):  # base -> DACP of one metric
        return f"{show(base[key])} -> {show(dacp[key])}"

    def mcq(d):
        return change(f"mcq_acc_norm/{d}", lambda p: accuracy(p, n_items[d]))

    # DACP keeps general ability: retention on the held-out set (the meaningful one) beside the replay corpus's own
    if dacp:
        held = (f"held-out general: bpb retention {pct(dacp['retention_bpb/heldout'])}, MCQ acc_norm "
                f"{mcq('heldout')} (retention {pct(dacp['retention_mcq/heldout'])}); in-distribution (the replay "
                f"corpus's own writing, not a measure of general ability): bpb retention "
                f"{pct(dacp['retention_bpb/general'])}")
        table.append(("retention", "DACP keeps general ability", held, track))
        gain = (f"{domain} bpb {change(f'bpb/{domain}', '{:.4f}'.format)}; MCQ acc_norm {mcq(domain)}; ROUGE-1 "
                f"{change(f'rouge1/{domain}', '{:.2f}'.format)}; BLEU-4 {change(f'bleu4/{domain}', '{:.2f}'.format)}")
        table.append(("domain", "DACP gains the domain", gain, track))

    # the replay sweep: domain bpb against held-out retention, one DACP run per ratio
    report = read_json(os.path.join(out, f"eval-replay-{domain}.json"))
    if report:  # its models: the base, then <out>/replay-sweep/replay-<ratio> for each ratio
        sweep = {os.path.basename(path).removeprefix("replay-"): m for path, m in report["metrics"].items()}
        cells = [f"{r}: {domain} bpb {m[f'bpb/{domain}']:.4f}, held-out bpb retention "
                 f"{pct(m['retention_bpb/heldout'])}, MCQ {pct(m['mcq_acc_norm/heldout'])}"
                 for r, m in list(sweep.items())[1:]]
        table.append(("replay", "the replay trade-off", "replay ratio " + "; ".join(cells),
                      ablation.format("replay")))
    else:
        table.append(("replay", "the replay trade-off", "not run yet", ablation.format("replay")))

    # SFT ablations: the same SFT from the base (no DACP), and single-stage SFT after DACP
    sft_report = read_json(os.path.join(out, f"eval-sft-{domain}.json"))
    sft_ab = metrics_by_stage(sft_report, ("alone", "single"))
    for key, name, other, what in (("sft_alone", "DACP + SFT against SFT alone", "alone", "SFT alone"),
                                   ("curriculum", "curriculum against single-stage SFT", "single", "single-stage")):
        if sft and other in sft_ab:
            o = sft_ab[other]
            noise = paired_rouge1(answers_of(track_report, 2, domain),
                                  answers_of(sft_report, ("alone", "single").index(other), domain), refs)
            ours = (f"ROUGE-1 {sft[f'rouge1/{domain}']:.2f} vs {o[f'rouge1/{domain}']:.2f} ({what}): "
                    f"{ratio(sft[f'rouge1/{domain}'], o[f'rouge1/{domain}'])}, {noise}; BLEU-4 "
                    f"{sft[f'bleu4/{domain}']:.2f} vs {o[f'bleu4/{domain}']:.2f}: "
                    f"{ratio(sft[f'bleu4/{domain}'], o[f'bleu4/{domain}'])}")
        else:
            ours = "not run yet"
        table.append((key, name, ours, ablation.format("sft")))

    # speculative decoding with the distilled draft, measured side by side with plain decoding
    spec = read_json(os.path.join(out, f"speculative-{domain}.json"))
    if spec:
        ours = (f"{spec['measured_speedup']:.2f}x ({spec['speculative_tokens_per_s']:.1f} vs "
                f"{spec['autoregressive_tokens_per_s']:.1f} tokens/s, {spec['prompts']} prompts, greedy, gamma "
                f"{spec['gamma']}); acceptance {spec['acceptance_rate']:.3f}, draft cost c {spec['cost_ratio']:.3f}; "
                f"predicted {spec['predicted_speedup']:.2f}x ({spec['predicted_speedup_measured_verify']:.2f}x with "
                f"the measured verify cost {spec['verify_cost']:.2f}); outputs identical {spec['identical_outputs']}")
    else:
        ours = "not run yet"
    table.append(("speculative", "speculative decoding with the distilled draft", ours, track))

    # what distillation adds: the same draft before and after, on the same held-out prompts
    acc = read_json(os.path.join(out, f"{domain}-draft", "acceptance.json"))
    if acc and {"before", "after"} <= set(acc):
        b, a = acc["before"], acc["after"]
        speedup = "" if None in (b["predicted_speedup_greedy"], a["predicted_speedup_greedy"]) else (
            f", predicted speedup {b['predicted_speedup_greedy']:.2f}x -> {a['predicted_speedup_greedy']:.2f}x "
            f"(+{100 * (a['predicted_speedup_greedy'] / b['predicted_speedup_greedy'] - 1):.0f} %)")
        ours = (f"greedy acceptance {b['acceptance_greedy']:.3f} -> {a['acceptance_greedy']:.3f}{speedup}; at T=1 "
                f"{b['acceptance_T=1']:.3f} -> {a['acceptance_T=1']:.3f}")
    else:  # not run, or stopped before its "after" measurement: visibly so
        ours = "not run yet" if acc is None else "incomplete: no measurement after distillation (rerun distill.py)"
    table.append(("distillation", "what distillation adds", ours, track))
    return table


def stage_times(out):
    """{"track": lines, "replay": lines, "sft": lines}: each stage's seconds and command, as workshop.sh wrote them
    (stage-times.txt, stage-times-<ablation>.txt), for those that have run."""
    times = {}
    for name, file in (("track", "stage-times.txt"), ("replay", "stage-times-replay.txt"),
                       ("sft", "stage-times-sft.txt")):
        path = os.path.join(out, file)
        if os.path.isfile(path):
            lines = open(path, encoding="utf-8").read().splitlines()
            times[name] = [t for t in lines if t.split() and t.split()[0].isdigit()]  # (blank or foreign lines)
    return times


def qa_references(data_root, domain):
    """The reference answers of data/<domain>/eval/qa.jsonl, in order (eval.py --limit N scores the first N)."""
    path = os.path.join(data_root, domain, "eval", "qa.jsonl")
    return [row["reference"] for _, row in read_jsonl(path)] if os.path.isfile(path) else []


def eval_sizes(data_root, domain):
    """Questions per MCQ set: what one question is worth."""
    sizes = {}
    for d in (domain, "general", "heldout"):
        path = os.path.join(data_root, d, "eval", "mcq.jsonl")
        sizes[d] = sum(1 for line in open(path, encoding="utf-8") if line.strip()) if os.path.isfile(path) else 1
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the track's output directory (e.g. out/real)")
    p.add_argument("--domain", default="telco")
    p.add_argument("--data-root", default="data")
    args = p.parse_args(argv)
    if not os.path.isdir(args.out):
        raise SystemExit(f"{args.out}: no such directory (run the track first: TARGET=<checkpoint> bash workshop.sh)")
    try:
        table = rows(args.out, args.domain, eval_sizes(args.data_root, args.domain),
                     qa_references(args.data_root, args.domain))
    except KeyError as e:
        raise SystemExit(f"error: {args.out}: a stage's report lacks {e} (rerun that stage)")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    lines = ["| result | paper | ours | command |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {PAPER[key]} | {ours} | `{cmd}` |" for key, name, ours, cmd in table]
    times = stage_times(args.out)
    for name, stages in times.items():
        what = "the track" if name == "track" else f"ABLATION={name}"
        total = sum(int(t.split()[0]) for t in stages)
        lines += ["", f"time per stage of {what} ({total // 60} min {total % 60} s in all):", ""]
        lines += [f"    {t}" for t in stages]
    text = "\n".join(lines) + "\n"
    print(text)
    try:
        write_atomic(os.path.join(args.out, "paper-vs-ours.md"), text)
        write_atomic(os.path.join(args.out, "paper-vs-ours.json"),
                     json.dumps({"rows": [dict(key=k, result=n, paper=PAPER[k], ours=o, command=c)
                                          for k, n, o, c in table], "stage_times": times}, indent=2) + "\n")
    except OSError as e:  # a read-only or full place: one line, the earlier table intact
        raise SystemExit(f"error: writing {args.out}/paper-vs-ours: {e.strerror}") from None
    print(f"written: {os.path.join(args.out, 'paper-vs-ours.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
