"""
ixi-GEN's replay ablation in miniature: DACP from the same base at several replay ratios, then one table of
domain bits per byte against general bits per byte (ixi-GEN Figure 3; Ibrahim et al. 2024, Table 2).

    python replay_sweep.py                                         # ratios 0, 0.1, 0.25, 0.5, 0.75, 1 from out/base
    torchrun --nproc_per_node=2 replay_sweep.py --max-steps 60     # any train.py flag is passed on to each run

Each ratio is an ordinary train.py run (same base, data, steps, LR schedule and seed; only --replay-ratio
changes) written to <out>/replay-<ratio>/. Ratio 1 (general text only) is the control: what the same training does
without the domain, so retention relative to it is forgetting alone. A finished run is reused and an interrupted
one resumed, so the sweep can be stopped and started again without losing work. Writes <out>/replay-sweep.md and
.json, and <out>/replay-sweep.png when matplotlib is installed (optional).
"""
import argparse
import json
import os
import sys

import torch.distributed as dist

import train
from checkpoint import holds_run, is_complete, read_metrics
from files import write_atomic
from parallel import launch, log, setup_distributed

RATIOS = "0,0.1,0.25,0.5,0.75,1"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other flags go to train.py (see python train.py --help).")
    p.add_argument("--ratios", default=RATIOS, help="comma-separated replay ratios")
    p.add_argument("--out", default=os.path.join("out", "replay-sweep"), help="one run per ratio in here")
    args, train_argv = p.parse_known_args(argv)
    args.train_argv = train_argv
    for flag in ("--replay-ratio", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in train_argv):
            p.error(f"{flag} is set by the sweep for each run")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        p.error(f"--ratios {args.ratios!r}: expected comma-separated numbers such as {RATIOS}")
    if any(not 0 <= r <= 1 for r in args.ratios):  # (1: no domain data trained, the control; its val still scored)
        p.error(f"--ratios {args.ratios}: each must be in [0, 1]")
    return args


def read_run(out):
    """(eval before, eval after) from a finished run's metrics.jsonl, or None if the run is not finished."""
    if not is_complete(out):
        return None
    evals = [row for row in read_metrics(os.path.join(out, "metrics.jsonl"))
             if any(k.startswith("bpb/") for k in row)]
    return (evals[0], evals[-1]) if len(evals) >= 2 else None


def sweep(args):
    setup_distributed()  # one process group for all the runs (train.run reuses it)
    results = []
    for ratio in args.ratios:
        out = os.path.join(args.out, f"replay-{ratio:g}")
        done = read_run(out)
        if done is None:
            resume = ["--resume"] if holds_run(out) else []
            run_args = train.get_args(args.train_argv + ["--replay-ratio", str(ratio), "--out", out] + resume)
            log(f"\n=== replay ratio {ratio:g}: {out}")
            train.run(run_args)
            done = read_run(out) if dist.get_rank() == 0 else ({}, {})
        else:
            log(f"=== replay ratio {ratio:g}: reusing the finished run in {out}")
        results.append((ratio, *done))
    return results


def table(results, domain, general):
    """Rows: the base (before DACP), then each ratio after DACP, with its general retention (bpb)."""
    base = results[0][1]
    lines = [f"| replay ratio | {domain} bpb | general bpb | general retention | {domain} gain |",
             "| --- | --- | --- | --- | --- |",
             f"| base (before DACP) | {base[f'bpb/{domain}']:.4f} | {base[f'bpb/{general}']:.4f} | 100.00% | |"]
    for ratio, before, after in results:
        kept = train.retention(before[f"bpb/{general}"], after[f"bpb/{general}"], lower_is_better=True)
        lines.append(f"| {ratio:g} | {after[f'bpb/{domain}']:.4f} | {after[f'bpb/{general}']:.4f} | {kept:.2%} | "
                     f"{1 - after[f'bpb/{domain}'] / before[f'bpb/{domain}']:.2%} |")
    return "\n".join(lines)


def plot(results, domain, general, path):
    """Domain bpb against general bpb, one point per ratio (lower-left is better on both); needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    base = results[0][1]
    ax.scatter([base[f"bpb/{domain}"]], [base[f"bpb/{general}"]], marker="x", color="gray")
    ax.annotate("base", (base[f"bpb/{domain}"], base[f"bpb/{general}"]), textcoords="offset points",
                xytext=(-10, 8))
    xs = [after[f"bpb/{domain}"] for _, _, after in results]
    ys = [after[f"bpb/{general}"] for _, _, after in results]
    ax.plot(xs, ys, "o-")
    for (ratio, _, _), x, y in zip(results, xs, ys):
        ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"{domain} bits per byte (val)")
    ax.set_ylabel(f"{general} bits per byte (val)")
    ax.set_title("DACP at several replay ratios")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    args = get_args(argv)
    results = launch(sweep, args)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    probe = train.get_args(args.train_argv)
    domain, general = probe.domain, probe.replay_domain
    report = table(results, domain, general)
    prefix = os.path.join(args.out, "replay-sweep")
    write_atomic(prefix + ".md", report + "\n")
    write_atomic(prefix + ".json", json.dumps([{"replay_ratio": r, "before": b, "after": a} for r, b, a in results],
                                              indent=1))
    print("\n" + report)
    wrote = plot(results, domain, general, prefix + ".png")
    print(f"\nwrote {prefix}.md, {prefix}.json" + (f", {prefix}.png" if wrote else " (pip install matplotlib for "
                                                                              "a plot)"))


if __name__ == "__main__":
    main(sys.argv[1:])
