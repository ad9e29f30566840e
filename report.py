"""The papers' headline results beside ours: one table from the real-model track's outputs.

    TARGET=models/smollm2-135m-instruct bash workshop.sh          # the track; its last stage runs this
    python report.py out/real --domain telco                       # again, after the ablations of workshop.sh

Reads what the stages wrote under <out>: eval-<domain>.json (base, DACP, DACP + SFT), speculative-<domain>.json,
<domain>-draft/acceptance.json (the draft before and after distillation), stage-times.txt, and each ablation's
output once it has run (ABLATION=... in workshop.sh; the replay sweep's ratio 1 is the general-only control that
retention is also measured against; eval-sft-<domain>.json's models are found by their folder names). A row whose
ablation has not run names the command that fills it. Writes <out>/paper-vs-ours.md and .json, and, when
matplotlib is installed (it is optional: without it, one line says so), two pictures beside them:
<out>/replay-tradeoff.png (domain bpb against held-out retention, a point per replay ratio) and <out>/loss-curves.png
(train and held-out loss against step of DACP, SFT and distillation).
`--compare OUT2` draws another track (the other checkpoint's) into the same pictures.

Every number carries its noise: an accuracy over n questions has a standard error of sqrt(p (1 - p) / n) (one
question is worth 100 / n points); a ROUGE-1 difference between two models on the same questions the standard
error of its per-question differences, a BLEU-4 difference (corpus BLEU, no mean over questions) that of a paired
bootstrap over the questions.
"""
import argparse
import io
import json
import math
import os
import sys

import numpy as np

from checkpoint import read_metrics
from data import read_jsonl
from eval import bleu_from_stats, bleu_stats, rouge1
from files import read_json, write_atomic

# The papers' figures, as the issue that asked for this table quotes them.
PAPER = {
    "retention": "SOAEsV2: 99.8 % of general ability retained",
    "domain": "ixi-GEN: telco benchmarks up, general kept",
    "replay": "ixi-GEN Fig. 3: more replay forgets less and learns the domain less; 50 % chosen",
    "sft_alone": "SOAEsV2: ROUGE-1 x1.08, BLEU-4 x1.17",
    "curriculum": "SOAEsV2: ROUGE-1 x1.02, BLEU-4 x1.06",
    "stages": "(our test of the row above: does the curriculum's last stage, long expert answers, set the length?)",
    "speculative": "SOAEsV2: 1.39-1.52x",
    "distillation": "DistillSpec: 10-45 % faster than the undistilled draft",
}


def metrics_by_stage(report, names, key="metrics"):
    """{name: metrics} (or, with key="answers", {name: QA answers}) of an eval.py report whose models were given in
    the order of `names`."""
    return dict(zip(names, report.get(key, {}).values())) if report else {}


def pct(x):
    return f"{100 * x:.1f} %"


def accuracy(p, n):
    """An accuracy with its standard error over n questions."""
    return f"{100 * p:.1f} % (± {100 * math.sqrt(p * (1 - p) / n):.1f})"


def ratio(a, b):
    return f"x{a / b:.2f}" if b else "n/a"


def paired_rouge1(hyps_a, hyps_b, refs):
    """ROUGE-1 of a minus b and its standard error, paired over the same questions: the mean of the per-question
    F1 differences and their standard deviation over sqrt(n)."""
    d = [rouge1([a], [r]) - rouge1([b], [r]) for a, b, r in zip(hyps_a, hyps_b, refs)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)) / math.sqrt(len(d))


def paired_bleu4(hyps_a, hyps_b, refs, samples=1000, seed=0):
    """Corpus BLEU-4 of a minus b and its standard error by the paired bootstrap (Koehn 2004): corpus BLEU is no
    mean over questions, so the questions are resampled with replacement, both systems scored on each resample,
    and the error is the standard deviation of the resampled differences."""
    a = np.array([bleu_stats(h, r) for h, r in zip(hyps_a, refs)], dtype=np.int64)
    b = np.array([bleu_stats(h, r) for h, r in zip(hyps_b, refs)], dtype=np.int64)
    picks = np.random.default_rng(seed).integers(len(refs), size=(samples, len(refs)))
    diffs = [bleu_from_stats(a[i].sum(0).tolist()) - bleu_from_stats(b[i].sum(0).tolist()) for i in picks]
    return bleu_from_stats(a.sum(0).tolist()) - bleu_from_stats(b.sum(0).tolist()), float(np.std(diffs, ddof=1))


def differences(hyps_a, hyps_b, refs):
    """The ROUGE-1 and BLEU-4 differences of a over b with their paired standard errors, as a table cell says it."""
    if not refs:
        return "no answers to pair"
    r, r_se = paired_rouge1(hyps_a, hyps_b, refs)
    b, b_se = paired_bleu4(hyps_a, hyps_b, refs)
    return f"ROUGE-1 {r:+.2f} ± {r_se:.2f}, BLEU-4 {b:+.2f} ± {b_se:.2f} (paired over {len(refs)} questions)"


def words(hyps):
    """Mean length of answers in words."""
    return sum(len(h.split()) for h in hyps) / max(len(hyps), 1)


def replay_sweep(out, domain):
    """{ratio: metrics} of <out>/eval-replay-<domain>.json, or None before it has run. Its models, in workshop.sh's
    order: the base (left out here), then <out>/replay-sweep/replay-<ratio> for each ratio."""
    report = read_json(os.path.join(out, f"eval-replay-{domain}.json"))
    if not report:
        return None
    _, *runs = report["metrics"].items()
    return {os.path.basename(path).removeprefix("replay-"): m for path, m in runs}


def by_name(report, domain):
    """{folder name: (metrics, QA answers)} of an eval.py report's models (answers [] where QA was not scored)."""
    if not report:
        return {}
    return {os.path.basename(os.path.normpath(path)): (m, report.get("answers", {}).get(path, {}).get(domain, []))
            for path, m in report["metrics"].items()}


def rows(out, domain, n_items, refs):
    """[(key, result, ours, command)] for the table, in the issue's order."""
    track_report = read_json(os.path.join(out, f"eval-{domain}.json"))
    if track_report is None:
        raise ValueError(f"{out}: no eval-{domain}.json, so the track has not run there "
                         f"(TARGET=<checkpoint> OUT={out} bash workshop.sh)")
    target = next(iter(track_report["metrics"]))  # the track's base: its report's first model
    track = f"TARGET={target} OUT={out} bash workshop.sh"
    ablation = f"TARGET={target} OUT={out} ABLATION={{}} bash workshop.sh"
    n_items = {**n_items, **track_report.get("questions", {})}  # what eval.py scored (--limit: fewer)
    stages = metrics_by_stage(track_report, ("base", "dacp", "sft"))
    base, dacp, sft = (stages.get(k, {}) for k in ("base", "dacp", "sft"))
    sft_answers = metrics_by_stage(track_report, ("base", "dacp", "sft"), "answers").get("sft", {}).get(domain, [])
    refs = refs[:len(sft_answers)]  # (eval.py --limit N scored the first N)
    sweep = replay_sweep(out, domain)
    control = (sweep or {}).get("1")  # the replay sweep's ratio 1: the DACP budget on general text only
    table = []

    def change(key, show):  # base -> DACP of one metric
        return f"{show(base[key])} -> {show(dacp[key])}"

    def mcq(d):
        return change(f"mcq_acc_norm/{d}", lambda p: accuracy(p, n_items[d]))

    def against_control(m):  # held-out retention of a DACP run relative to the control: lower bpb is better
        return (f"bpb {pct(control['bpb/heldout'] / m['bpb/heldout'])}, MCQ acc_norm "
                f"{pct(m['mcq_acc_norm/heldout'] / control['mcq_acc_norm/heldout'])}")

    # DACP keeps general ability. Against the base, retention counts forgetting and whatever any training repairs in
    # a (de-quantised) checkpoint; against the control, trained as long on general text alone, only forgetting.
    if dacp:
        held = (f"held-out general, against the base: bpb retention {pct(dacp['retention_bpb/heldout'])}, MCQ "
                f"acc_norm {mcq('heldout')} (retention {pct(dacp['retention_mcq/heldout'])}); ")
        if control:
            repair = (f"bpb {pct(base['bpb/heldout'] / control['bpb/heldout'])}, MCQ acc_norm "
                      f"{pct(control['mcq_acc_norm/heldout'] / base['mcq_acc_norm/heldout'])}")
            held += (f"**against the general-only control (the forgetting): {against_control(dacp)}** (the control "
                     f"against the base, what training alone does: {repair}); ")
        else:
            held += f"against the general-only control: not run yet ({ablation.format('replay')}); "
        held += (f"in-distribution (the replay corpus's own writing, not a measure of general ability): bpb "
                 f"retention {pct(dacp['retention_bpb/general'])}")
        table.append(("retention", "DACP keeps general ability", held, track))
        gain = (f"{domain} bpb {change(f'bpb/{domain}', '{:.4f}'.format)}; MCQ acc_norm {mcq(domain)}; ROUGE-1 "
                f"{change(f'rouge1/{domain}', '{:.2f}'.format)}; BLEU-4 {change(f'bleu4/{domain}', '{:.2f}'.format)}")
        if control:  # what the domain data did, beyond what training on general text alone does to the domain
            gain += f" (the general-only control: {domain} bpb {control[f'bpb/{domain}']:.4f})"
        table.append(("domain", "DACP gains the domain", gain, track))

    # the replay sweep: domain bpb against held-out retention, one DACP run per ratio
    if sweep:
        cells = []
        for r, m in sweep.items():
            vs_control = f" (against the control {pct(control['bpb/heldout'] / m['bpb/heldout'])})" if control else ""
            cells.append(f"{r}: {domain} bpb {m[f'bpb/{domain}']:.4f}, held-out bpb retention "
                         f"{pct(m['retention_bpb/heldout'])}{vs_control}, MCQ {pct(m['mcq_acc_norm/heldout'])}")
        table.append(("replay", "the replay trade-off", "replay ratio " + "; ".join(cells),
                      ablation.format("replay")))
    else:
        table.append(("replay", "the replay trade-off", "not run yet", ablation.format("replay")))

    # SFT ablations: the same SFT from the base (no DACP), and single-stage SFT after DACP, each with the paired
    # differences of the track's DACP + curriculum SFT over it
    sft_runs = by_name(read_json(os.path.join(out, f"eval-sft-{domain}.json")), domain)
    for key, name, suffix, what in (("sft_alone", "DACP + SFT against SFT alone", "-sft-alone", "SFT alone"),
                                    ("curriculum", "curriculum against single-stage SFT", "-sft-single",
                                     "single-stage")):
        if sft and domain + suffix in sft_runs:
            o, answers = sft_runs[domain + suffix]
            ours = (f"ROUGE-1 {sft[f'rouge1/{domain}']:.2f} vs {o[f'rouge1/{domain}']:.2f} ({what}): "
                    f"{ratio(sft[f'rouge1/{domain}'], o[f'rouge1/{domain}'])}; BLEU-4 "
                    f"{sft[f'bleu4/{domain}']:.2f} vs {o[f'bleu4/{domain}']:.2f}: "
                    f"{ratio(sft[f'bleu4/{domain}'], o[f'bleu4/{domain}'])}; differences: "
                    f"{differences(sft_answers, answers, refs)}")
        else:
            ours = "not run yet"
        table.append((key, name, ours, ablation.format("sft")))

    # the curriculum's reading tested: each stage's model, and the curriculum with its last two stages swapped
    exports = sorted(n for n in sft_runs if n.startswith("stage-"))
    if sft and exports and domain + "-sft-swapped" in sft_runs:
        steps = [(n.split("-", 2)[2], *sft_runs[n]) for n in exports] + [("the curriculum's end", sft, sft_answers)]
        cells = [f"after {n}: ROUGE-1 {m[f'rouge1/{domain}']:.2f}, BLEU-4 {m[f'bleu4/{domain}']:.2f}, "
                 f"{words(a):.0f} words" for n, m, a in steps]
        swapped, swapped_answers = sft_runs[domain + "-sft-swapped"]
        ours = (f"the references: {words(refs):.0f} words on average; " + "; ".join(cells) + "; the last two stages "
                f"swapped: ROUGE-1 {swapped[f'rouge1/{domain}']:.2f}, BLEU-4 {swapped[f'bleu4/{domain}']:.2f}, "
                f"{words(swapped_answers):.0f} words, against the curriculum "
                f"{differences(swapped_answers, sft_answers, refs)}")
    else:
        ours = "not run yet"
    table.append(("stages", "the curriculum's last stage", ours, ablation.format("sft")))

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


# -----------------------------------------------------------------------------
# Pictures: the replay trade-off and the loss curves, drawn when matplotlib is installed (never required)

# <out>/<domain><suffix>/metrics.jsonl, and what its train loss is (distillation's depends on distill.py --loss)
STAGES = (("", "DACP", "loss (nats per token)"), ("-sft", "SFT", "loss (nats per token)"),
          ("-draft", "distillation", "distillation loss"))


def checkpoint_name(out, domain):
    """The name of the checkpoint a track adapted (its base, the first model of its eval reports), to label its
    series; the folder's name before any report exists."""
    for name in (f"eval-{domain}.json", f"eval-replay-{domain}.json"):
        report = read_json(os.path.join(out, name))
        if report and report.get("metrics"):
            return os.path.basename(os.path.normpath(next(iter(report["metrics"]))))
    return os.path.basename(os.path.normpath(out))


def replay_points(out, domain):
    """[(ratio, held-out bpb retention in %, domain bpb)] of a track's replay sweep, in the sweep's order; runs
    scored without the held-out set are left out (they have no retention to place them by)."""
    sweep = replay_sweep(out, domain)
    return [(r, 100 * m["retention_bpb/heldout"], m[f"bpb/{domain}"]) for r, m in (sweep or {}).items()
            if "retention_bpb/heldout" in m and f"bpb/{domain}" in m]


def loss_curves(out, domain):
    """{stage: {series: [(step, value)]}} from each stage's metrics.jsonl: the train loss of every step, and the
    held-out measures of the evaluation rows (val/<name> in nats per token, as the train loss; distillation's
    tvd/<domain> to the teacher, a different unit). A damaged file is skipped with a note: pictures are extras."""
    curves = {}
    for suffix, stage, _ in STAGES:
        path = os.path.join(out, domain + suffix, "metrics.jsonl")
        try:
            metrics = read_metrics(path)
        except ValueError as e:
            print(f"plots: skipping {e}", file=sys.stderr)
            continue
        series = {}
        for row in metrics:
            for key, value in row.items():
                if (key == "loss" or key.startswith(("val/", "tvd/"))) and isinstance(value, (int, float)):
                    series.setdefault("train loss" if key == "loss" else key, []).append((row["step"], value))
        if series:
            curves[stage] = series
    return curves


def save_png(fig, path):
    """Render with Agg (no display needed, nothing global: pyplot is never imported) and write atomically, so a
    reader never sees half a picture and a failed write leaves the last one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path


def plots(outs, domain):
    """Draw <outs[0]>/replay-tradeoff.png and loss-curves.png, a series (or a row) per track in outs; returns the
    paths written. Without matplotlib: one line on stderr and nothing written."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("plots: matplotlib is not installed (pip install matplotlib), so no PNGs", file=sys.stderr)
        return []
    written = []
    names = [checkpoint_name(out, domain) for out in outs]

    sweeps = [(name, replay_points(out, domain)) for name, out in zip(names, outs)]
    if any(points for _, points in sweeps):
        fig = Figure(figsize=(6.4, 4.8))
        ax = fig.add_subplot()
        for name, points in sweeps:
            if points:
                line, = ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label=name)
                for ratio, x, y in points:  # each point named by its replay ratio
                    ax.annotate(ratio, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                                color=line.get_color())
        ax.axvline(100, color="grey", linewidth=0.8, linestyle=":")  # the base: nothing forgotten, nothing repaired
        ax.set(xlabel="held-out general bpb retention (%), right: less forgotten",
               ylabel=f"{domain} bpb, down: more of the domain learnt",
               title="the replay trade-off (labels: replay ratio)")
        ax.legend()
        written.append(save_png(fig, os.path.join(outs[0], "replay-tradeoff.png")))

    tracks = [(name, loss_curves(out, domain)) for name, out in zip(names, outs)]
    tracks = [(name, curves) for name, curves in tracks if curves]
    if tracks:
        fig = Figure(figsize=(4.2 * len(STAGES), 3.4 * len(tracks)))
        axes = fig.subplots(len(tracks), len(STAGES), squeeze=False)
        for row, (name, curves) in zip(axes, tracks):
            for ax, (_, stage, ylabel) in zip(row, STAGES):
                ax.set_title(f"{name}: {stage}", fontsize=10)
                series = curves.get(stage)
                if not series:
                    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                    continue
                other = None  # a second y axis for a held-out measure in another unit than the loss (TVD)
                for key, points in series.items():
                    target = ax
                    if key != "train loss" and not key.startswith("val/"):
                        if other is None:
                            other = ax.twinx()
                            other.set_ylabel("held-out TVD to the teacher")
                        target = other
                    # evaluations are a few points (and a smoke run's loss one): show each one
                    style = "-" if key == "train loss" and len(points) > 1 else "o--"
                    target.plot(*zip(*points), style, label=key, markersize=3,
                                **({} if target is ax else {"color": "tab:red"}))
                ax.set(xlabel="step", ylabel=ylabel)
                handles = [h for a in (ax, other) if a for h in a.get_legend_handles_labels()[0]]
                ax.legend(handles=handles, fontsize=7)
        fig.tight_layout()
        written.append(save_png(fig, os.path.join(outs[0], "loss-curves.png")))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the track's output directory (e.g. out/real)")
    p.add_argument("--domain", default="telco")
    p.add_argument("--data-root", default="data")
    p.add_argument("--compare", action="append", default=[], metavar="OUT",
                   help="another track's output directory (the other checkpoint's) to draw beside this one in the "
                        "pictures; repeatable")
    args = p.parse_args(argv)
    for out in [args.out] + args.compare:
        if not os.path.isdir(out):
            raise SystemExit(f"{out}: no such directory (run the track first: TARGET=<checkpoint> bash workshop.sh)")
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
    try:
        for path in plots([args.out] + args.compare, args.domain):
            print(f"written: {path}", file=sys.stderr)
    except OSError as e:
        raise SystemExit(f"error: writing a picture in {args.out}: {e.strerror}") from None
    except (KeyError, ValueError) as e:  # a report whose table was fine but lacks what a picture needs
        raise SystemExit(f"error: drawing the pictures: {e}") from None


if __name__ == "__main__":
    main()
