"""report.py: the noise it prints beside each number is the textbook formula on a reference implementation's
scores (rouge_score per question, statistics.stdev), and an accuracy's standard error is sqrt(p (1 - p) / n)."""
import json
import math
import random
import statistics
import sys

import pytest
import sacrebleu
from conftest import REPO
from rouge_score import rouge_scorer

import report

HYPS_A = ["the cell hands the call over", "data slows after the cap", "a prepaid balance runs out", "roaming fees"]
HYPS_B = ["the call is dropped", "data is slow", "balance", "fees apply abroad when roaming"]
REFS = ["the serving cell hands the call over to a neighbour", "speed is cut once the data cap is passed",
        "the prepaid balance ran out", "roaming fees apply abroad"]


def test_paired_rouge1_difference_and_its_standard_error():
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    d = [100 * (scorer.score(r, a)["rouge1"].fmeasure - scorer.score(r, b)["rouge1"].fmeasure)
         for a, b, r in zip(HYPS_A, HYPS_B, REFS)]
    mean, se = report.paired_rouge1(HYPS_A, HYPS_B, REFS)
    assert mean == pytest.approx(statistics.mean(d)) and se == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)))


def test_paired_bleu4_is_sacrebleus_difference_with_its_bootstrap_error():
    """The difference is sacrebleu's corpus BLEU of a minus b; the error that of a paired bootstrap computed with
    sacrebleu itself on independent resamples (two bootstraps of 400 agree within about 5 %; 20 % allowed)."""
    refs = [json.loads(line)["reference"] for line in open(f"{REPO}/data/telco/eval/qa.jsonl")][:60]
    a = [" ".join(w for i, w in enumerate(r.split()) if i % 3) for r in refs]  # every third word dropped
    b = [" ".join(r.split()[:len(r.split()) // 2]) for r in refs]  # the first half
    diff, se = report.paired_bleu4(a, b, refs, samples=400)
    assert diff == pytest.approx(sacrebleu.corpus_bleu(a, [refs]).score - sacrebleu.corpus_bleu(b, [refs]).score)
    rng, diffs = random.Random(1), []
    for _ in range(400):
        pick = [rng.randrange(len(refs)) for _ in refs]
        resample = lambda hyps: sacrebleu.corpus_bleu([hyps[i] for i in pick], [[refs[i] for i in pick]]).score
        diffs.append(resample(a) - resample(b))
    assert se == pytest.approx(statistics.stdev(diffs), rel=0.2)


def test_accuracy_standard_error():
    assert report.accuracy(0.25, 100) == f"25.0 % (± {100 * math.sqrt(0.25 * 0.75 / 100):.1f})"


# -----------------------------------------------------------------------------
# The track's outputs as the report finds them: limited, incomplete, damaged


def track_outputs(folder, questions=None):
    """An <out> folder with an eval-telco.json of three models (every metric 0.5) and a stage-times.txt."""
    keys = ["bpb/telco", "mcq_acc_norm/telco", "rouge1/telco", "bleu4/telco", "mcq_acc_norm/heldout", "bpb/heldout",
            "retention_bpb/heldout", "retention_mcq/heldout", "retention_bpb/general"]
    metrics = {name: {k: 0.5 for k in keys} for name in ("base", "dacp", "sft")}
    folder.mkdir()
    (folder / "eval-telco.json").write_text(json.dumps({"metrics": metrics, "answers": {},
                                                        **({"questions": questions} if questions else {})}))
    (folder / "stage-times.txt").write_text("12 s  python train.py ...\n\n30 s  python sft.py ...\n")
    return folder


def test_the_standard_error_is_that_of_the_questions_scored(tmp_path, capsys):
    """eval.py --limit 5 scores 5 questions: the ± is sqrt(p (1 - p) / 5), not that of the whole file."""
    out = track_outputs(tmp_path / "out", questions={"telco": 5, "heldout": 5})
    report.main([str(out), "--data-root", REPO + "/data"])
    text = (out / "paper-vs-ours.md").read_text()
    assert f"MCQ acc_norm {report.accuracy(0.5, 5)} -> {report.accuracy(0.5, 5)}" in text
    assert "42 s in all" in text  # a blank line in stage-times.txt is no stage


def test_each_command_names_the_checkpoint_the_track_adapted(tmp_path):
    """A row's command is one to paste: the track's base (its report's first model), not a placeholder."""
    out = track_outputs(tmp_path / "out")
    report.main([str(out), "--data-root", REPO + "/data"])
    text = (out / "paper-vs-ours.md").read_text()
    assert f"TARGET=base OUT={out} ABLATION=replay bash workshop.sh" in text
    assert "<checkpoint>" not in text


def test_an_unfinished_distillation_is_shown_as_incomplete(tmp_path):
    out = track_outputs(tmp_path / "out")
    (out / "telco-draft").mkdir()
    (out / "telco-draft" / "acceptance.json").write_text(json.dumps({"before": {}}))
    report.main([str(out), "--data-root", REPO + "/data"])
    assert "incomplete: no measurement after distillation" in (out / "paper-vs-ours.md").read_text()


def test_a_folder_without_the_track_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no eval-telco.json, so the track has not run"):
        report.main([str(tmp_path / "empty")])


def test_a_truncated_report_is_named(tmp_path):
    out = track_outputs(tmp_path / "out")
    (out / "eval-telco.json").write_text('{"metrics": {"base": ')
    with pytest.raises(SystemExit, match=r"eval-telco.json: not valid JSON"):
        report.main([str(out)])


def test_an_unwritable_report_is_a_one_line_error(tmp_path):
    out = track_outputs(tmp_path / "out")
    (out / "paper-vs-ours.md").mkdir()  # (root ignores file modes: a folder in the way fails the same as they do)
    with pytest.raises(SystemExit, match=r"error: writing .*paper-vs-ours"):
        report.main([str(out), "--data-root", REPO + "/data"])


# -----------------------------------------------------------------------------
# The pictures: drawn from the same outputs when matplotlib is there, one line when it is not

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def with_sweep_and_curves(out, base="models/smollm2-135m-instruct"):
    """Add to a track's <out> what the pictures read: the replay sweep's eval report (the base, then a run per
    ratio) and each stage's metrics.jsonl (train loss every step, held-out rows at some steps)."""
    keys = ("bpb/telco", "retention_bpb/heldout", "mcq_acc_norm/heldout")
    metrics = {base: dict(zip(keys, (1.5, 1.0, 0.7)))}
    for ratio, bpb, kept in (("0", 1.20, 0.95), ("0.5", 1.25, 1.01), ("0.75", 1.32, 1.03)):
        metrics[f"{out}/replay-sweep/replay-{ratio}"] = dict(zip(keys, (bpb, kept, 0.7)))
    (out / "eval-replay-telco.json").write_text(json.dumps({"metrics": metrics}))
    for stage, held_out in (("telco", "val/telco"), ("telco-sft", "val/3_expert"), ("telco-draft", "tvd/telco")):
        (out / stage).mkdir()
        rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-4, **({held_out: 2.0 / s} if s % 5 == 0 else {})}
                for s in range(1, 21)]
        (out / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_the_pictures_read_the_sweep_and_each_stage(tmp_path):
    out = with_sweep_and_curves(track_outputs(tmp_path / "out"))
    assert report.replay_points(str(out), "telco") == [("0", 95.0, 1.20), ("0.5", 101.0, 1.25),
                                                       ("0.75", 103.0, 1.32)]
    curves = report.loss_curves(str(out), "telco")
    assert set(curves) == {"DACP", "SFT", "distillation"}
    assert curves["SFT"]["train loss"][0] == (1, 3.0) and len(curves["SFT"]["train loss"]) == 20
    assert curves["SFT"]["val/3_expert"] == [(5, 0.4), (10, 0.2), (15, 2.0 / 15), (20, 0.1)]
    assert set(curves["distillation"]) == {"train loss", "tvd/telco"}
    assert report.checkpoint_name(str(tmp_path / "none"), "telco") == "none"


def test_pictures_are_png_files_beside_the_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    out = with_sweep_and_curves(track_outputs(tmp_path / "out"))
    (tmp_path / "gemma").mkdir()
    other = with_sweep_and_curves(tmp_path / "gemma", base="models/gemma3-270m")  # the other checkpoint's track
    assert report.checkpoint_name(str(other), "telco") == "gemma3-270m"
    (other / "metrics.jsonl").write_text("")  # (not a stage: ignored)
    (out / "telco-draft" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')  # damaged
    report.main([str(out), "--data-root", REPO + "/data", "--compare", str(other)])
    err = capsys.readouterr().err
    for name in ("replay-tradeoff.png", "loss-curves.png"):
        assert f"written: {out / name}" in err
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
        height, width, _ = imread(out / name).shape  # decodes as an image
        assert height > 100 and width > 100
        assert not (other / name).exists()  # the pictures go beside this track's table only
    assert "plots: skipping" in err and "telco-draft/metrics.jsonl:2" in err
    # nothing half-written left behind: the table, its JSON, the two pictures and the inputs
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        ["eval-telco.json", "eval-replay-telco.json", "stage-times.txt", "paper-vs-ours.md", "paper-vs-ours.json",
         "replay-tradeoff.png", "loss-curves.png"])


def test_without_matplotlib_one_line_and_no_pictures(tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # (None in sys.modules: importing it raises ImportError)
    out = with_sweep_and_curves(track_outputs(tmp_path / "out"))
    report.main([str(out), "--data-root", REPO + "/data"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("plots:")]
    assert lines == ["plots: matplotlib is not installed (pip install matplotlib), so no PNGs"]
    assert (out / "paper-vs-ours.md").is_file()
    assert not list(out.glob("*.png"))


def test_a_missing_comparison_track_is_named(tmp_path):
    out = track_outputs(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"nowhere: no such directory"):
        report.main([str(out), "--compare", str(tmp_path / "nowhere")])


def test_retention_against_the_control_and_the_curriculum_stages(tmp_path):
    """Retention against the general-only control (the replay sweep's ratio 1) is the control's held-out bpb over the
    DACP run's (and MCQ acc_norm the other way up); the SFT ablation's models are found by their folder names, stage
    exports included."""
    out = track_outputs(tmp_path / "out")
    track = json.loads((out / "eval-telco.json").read_text())
    track["answers"] = {name: {"telco": HYPS_A} for name in track["metrics"]}
    (out / "eval-telco.json").write_text(json.dumps(track))
    sweep = {"base": {}, f"{out}/replay-sweep/replay-1": {"bpb/heldout": 0.6, "mcq_acc_norm/heldout": 0.4,
                                                          "bpb/telco": 0.7, "retention_bpb/heldout": 0.8}}
    (out / "eval-replay-telco.json").write_text(json.dumps({"metrics": sweep}))
    names = ["telco-sft-alone", "telco-sft-single", "telco-sft/stage-1-1_general", "telco-sft/stage-2-2_telco",
             "telco-sft-swapped"]
    (out / "eval-sft-telco.json").write_text(json.dumps(
        {"metrics": {f"{out}/{n}": {"rouge1/telco": 10.0 + i, "bleu4/telco": 1.0} for i, n in enumerate(names)},
         "answers": {f"{out}/{n}": {"telco": HYPS_B} for n in names}}))
    table = {key: ours for key, _, ours, _ in report.rows(str(out), "telco", {"telco": 4, "heldout": 4}, REFS)}
    assert "against the general-only control (the forgetting): bpb 120.0 %, MCQ acc_norm 125.0 %" in \
        table["retention"]
    assert "the control against the base, what training alone does: bpb 83.3 %, MCQ acc_norm 80.0 %" in \
        table["retention"]
    assert table["domain"].endswith("(the general-only control: telco bpb 0.7000)")
    assert "ROUGE-1 0.50 vs 10.00 (SFT alone)" in table["sft_alone"]
    assert "ROUGE-1 0.50 vs 11.00 (single-stage)" in table["curriculum"]
    mean, se = report.paired_rouge1(HYPS_B, HYPS_A, REFS)
    assert table["stages"].startswith(f"the references: {report.words(REFS):.0f} words on average; after "
                                      f"1_general: ROUGE-1 12.00, BLEU-4 1.00, {report.words(HYPS_B):.0f} words")
    assert f"ROUGE-1 {mean:+.2f} ± {se:.2f}" in table["stages"]
