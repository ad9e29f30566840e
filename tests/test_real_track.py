"""The real-model track (`TARGET=models/smollm2-135m-instruct bash workshop.sh`) end to end with every knob turned
down, on a small copy of the sample data: DACP, curriculum SFT, the truncated draft distilled from the SFT target,
speculative decoding, the evaluation of base / DACP / DACP + SFT with held-out retention, and both ablations (the
replay sweep with the general-only control, the SFT one with each curriculum stage's model). Each
trained output loads in transformers with our logits; the report and the paper-vs-ours table are written, each
ablation's row filled once it has run. Needs the real checkpoint (python prepare_real_model.py). About 4 minutes
on 2 CPU cores, so it is marked `track` and run apart: `python -m pytest -q -m track`."""
import json
import os
import shutil
import subprocess

import pytest
import torch
import transformers

from conftest import REPO

from model import Transformer
from tokenizer import Tokenizer

REAL = os.environ.get("REAL_MODEL", os.path.join(REPO, "models", "smollm2-135m-instruct"))
pytestmark = [pytest.mark.track,
              pytest.mark.skipif(not os.path.isfile(os.path.join(REAL, "config.json")),
                                 reason=f"no real checkpoint at {REAL} (run python prepare_real_model.py)")]
KNOBS = dict(TARGET=REAL, DOMAIN="telco", DACP_STEPS="2", SFT_EPOCHS="1", SFT_BATCH="4", DISTILL_STEPS="2",
             DRAFT_LAYERS="2", GEN_TOKENS="8", EVAL_LIMIT="3", BENCH_PROMPTS="1", BENCH_TOKENS="8", RATIOS="0,0.5,1")


def small_data(root):
    """Two texts per train split, one per val split, four conversations per SFT stage, the eval sets as they are
    (EVAL_LIMIT keeps 3 rows of each)."""
    src = os.path.join(REPO, "data")
    for domain in ("telco", "general", "heldout"):
        for split, keep in (("train", 2), ("val", 1)):
            if os.path.isdir(os.path.join(src, domain, split)):
                os.makedirs(root / domain / split)
                for f in sorted(os.listdir(os.path.join(src, domain, split)))[:keep]:
                    shutil.copy(os.path.join(src, domain, split, f), root / domain / split / f)
        shutil.copytree(os.path.join(src, domain, "eval"), root / domain / "eval")
    os.makedirs(root / "telco" / "sft")
    for f in sorted(os.listdir(os.path.join(src, "telco", "sft"))):
        if f.endswith(".jsonl"):
            lines = open(os.path.join(src, "telco", "sft", f), encoding="utf-8").readlines()[:4]
            (root / "telco" / "sft" / f).write_text("".join(lines), encoding="utf-8")


def workshop(out, data, **extra):
    env = {**os.environ, **KNOBS, "OUT": str(out), "DATA": str(data), **extra}
    proc = subprocess.run(["bash", os.path.join(REPO, "workshop.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def track(tmp_path_factory):
    data, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("real")
    small_data(data)
    stdout = workshop(out, data)
    return out, data, stdout


@pytest.mark.parametrize("stage", ["telco", "telco-sft", "telco-draft"])
def test_every_output_is_an_hf_model_with_our_logits(track, stage):
    out, _, _ = track
    path = os.path.join(out, stage)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    ids = Tokenizer.from_pretrained(path).encode("The eNodeB hands the call over to the target cell when")
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(x).logits
        assert ((ours(x) - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
    if stage == "telco-draft":  # the truncated copy: 2 of the target's 30 layers
        assert hf.config.num_hidden_layers == 2


def test_the_report_and_the_paper_table_are_written(track):
    out, _, stdout = track
    metrics = json.load(open(os.path.join(out, "eval-telco.json")))["metrics"]
    assert list(metrics) == [REAL, os.path.join(out, "telco"), os.path.join(out, "telco-sft")]
    dacp = metrics[os.path.join(out, "telco")]
    assert {"retention_bpb/heldout", "retention_mcq/heldout", "retention_bpb/general", "rouge1/telco"} <= set(dacp)
    assert set(json.load(open(os.path.join(out, "telco-draft", "acceptance.json")))) == {"before", "after"}
    table = open(os.path.join(out, "paper-vs-ours.md")).read()
    for row in ("DACP keeps general ability", "DACP gains the domain", "speculative decoding with the distilled draft",
                "what distillation adds"):
        assert f"| {row} |" in table
    assert table.count("not run yet") == 5  # the control, the replay sweep, the two SFT ablations, the stages
    assert "time per stage" in table
    assert stdout.count("\n+ ") == 6  # DACP, SFT, distillation, speculative, eval, report: each printed


def test_the_ablations_fill_their_rows(track):
    out, data, _ = track
    workshop(out, data, ABLATION="sft")
    workshop(out, data, ABLATION="replay")
    rows = {r["key"]: r["ours"] for r in json.load(open(os.path.join(out, "paper-vs-ours.json")))["rows"]}
    assert "not run yet" not in json.dumps(rows)
    assert rows["sft_alone"].count("x") >= 2 and "0: telco bpb" in rows["replay"]
    assert "BLEU-4" in rows["curriculum"] and "± " in rows["curriculum"]  # the paired differences
    assert "after 1_general" in rows["stages"] and "the last two stages swapped" in rows["stages"]
    sft_runs = json.load(open(os.path.join(out, "eval-sft-telco.json")))["metrics"]
    assert [os.path.basename(m) for m in sft_runs] == ["telco-sft-alone", "telco-sft-single", "stage-1-1_general",
                                                         "stage-2-2_telco", "telco-sft-swapped"]
    sweep = json.load(open(os.path.join(out, "eval-replay-telco.json")))["metrics"]
    assert len(sweep) == 4  # the base, then ratios 0, 0.5 (the track's own DACP run, reused) and 1 (the control)
    assert "against the general-only control (the forgetting): bpb " in rows["retention"]
    assert os.path.realpath(os.path.join(out, "replay-sweep", "replay-0.5")) == os.path.realpath(
        os.path.join(out, "telco"))
