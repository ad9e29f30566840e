"""The workshop end to end (workshop.sh) with every knob turned down: each stage's output directory loads in
transformers with our logits and tokenizer ids, and every stage left its metrics and reports. About a minute and a
half on 2 CPU cores; skip it locally with `pytest -m "not pipeline"`."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import REPO

from model import Transformer
from tokenizer import Tokenizer


pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def workshop(tmp_path_factory):
    out = tmp_path_factory.mktemp("workshop")
    knobs = dict(OUT=str(out), DOMAIN="finance", TARGET="tiny", DRAFT="tiny", BASE_STEPS="4", DACP_STEPS="4",
                 SFT_EPOCHS="1", DISTILL_STEPS="3", GEN_TOKENS="8", EVAL_LIMIT="3", BENCH_PROMPTS="2")
    proc = subprocess.run(["bash", os.path.join(REPO, "workshop.sh")], env={**os.environ, **knobs},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.parametrize("stage", ["base", "finance", "finance-sft", "finance-draft"])
def test_every_stage_is_an_hf_model_with_its_metrics(workshop, stage):
    out, _ = workshop
    path = os.path.join(out, stage)
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    assert rows[-1]["step"] == max(r["step"] for r in rows) and all("loss" in r for r in rows if r["step"] > 0)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    text = "The customer asked why the invoice changed after the rate moved."
    ids = Tokenizer.from_pretrained(path).encode(text)
    assert ids == transformers.AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_reports_are_written(workshop):
    out, stdout = workshop
    report = json.load(open(os.path.join(out, "eval-finance.json")))
    assert "finance" in json.dumps(report) and "general" in json.dumps(report)
    header = open(os.path.join(out, "eval-finance.md")).readline()  # one column per model, in pipeline order
    assert header.split("|")[2:5] == [f" {os.path.join(out, stage)} " for stage in ("base", "finance", "finance-sft")]
    bench = json.load(open(os.path.join(out, "speculative-finance.json")))
    same, total = bench["identical_outputs"].split("/")  # greedy speculative decoding = the target's greedy
    assert same == total == "2"
    assert stdout.count("\n+ ") == 6  # the six stages' commands, each printed before it ran


def test_a_second_run_skips_the_finished_stages(workshop):
    out, _ = workshop
    before = open(os.path.join(out, "base", "metrics.jsonl")).read()
    knobs = dict(OUT=str(out), DOMAIN="finance", TARGET="tiny", DRAFT="tiny", EVAL_LIMIT="3", BENCH_PROMPTS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "workshop.sh")], env={**os.environ, **knobs},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("is already there: skipping") == 4
    assert open(os.path.join(out, "base", "metrics.jsonl")).read() == before


def test_replay_sweep_from_the_workshop_base(workshop, tmp_path):
    """replay_sweep.py: one DACP run per ratio from the same base, and a table whose retention is general bpb
    before / after, read back from each run's metrics.jsonl. A second call reuses the finished runs."""
    out, _ = workshop
    cmd = [sys.executable, os.path.join(REPO, "replay_sweep.py"), "--ratios", "0,0.5", "--out", str(tmp_path),
           "--init-from", os.path.join(out, "base"), "--domain", "finance", "--max-steps", "2", "--eval-every", "0",
           "--batch-size", "4", "--micro-batch-size", "4", "--seq-len", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = open(tmp_path / "replay-sweep.md").read().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["base (before DACP)", "0", "0.5"]
    for ratio, line in zip(["0", "0.5"], table[3:]):
        rows = [json.loads(r) for r in open(tmp_path / f"replay-{ratio}" / "metrics.jsonl")]
        evals = [r for r in rows if "bpb/general" in r]
        retention = evals[0]["bpb/general"] / evals[-1]["bpb/general"]
        assert line.split("|")[4].strip() == f"{retention:.2%}"
        assert line.split("|")[3].strip() == f"{evals[-1]['bpb/general']:.4f}"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing the finished run") + \
        again.stderr.count("reusing the finished run") == 2
    assert open(tmp_path / "replay-sweep.md").read().splitlines() == table


def test_the_replay_ablation_finds_the_runs_its_sweep_wrote(workshop):
    """RATIOS=0.0,0.50: the sweep names its runs replay-0 and replay-0.5 (as %g writes them); eval.py is given
    those names, not replay-0.0 (which does not exist)."""
    out, _ = workshop
    knobs = dict(OUT=str(out), DOMAIN="finance", TARGET="tiny", DRAFT="tiny", DACP_STEPS="4", SFT_EPOCHS="1",
                 EVAL_LIMIT="2", ABLATION="replay", RATIOS="0.0,0.50")
    proc = subprocess.run(["bash", os.path.join(REPO, "workshop.sh")], env={**os.environ, **knobs},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = json.load(open(os.path.join(out, "eval-replay-finance.json")))["metrics"]
    assert [os.path.basename(m) for m in models][1:] == ["replay-0", "replay-0.5"]
