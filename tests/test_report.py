"""report.py: the noise it prints beside each number is the textbook formula on a reference implementation's
scores (rouge_score per question, statistics.stdev), and an accuracy's standard error is sqrt(p (1 - p) / n)."""
import json
import math
import statistics

import pytest
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
    expected = f"difference {statistics.mean(d):+.2f} ± {statistics.stdev(d) / math.sqrt(len(d)):.2f} " \
               f"(paired over {len(d)} questions)"
    assert report.paired_rouge1(HYPS_A, HYPS_B, REFS) == expected


def test_accuracy_standard_error():
    assert report.accuracy(0.25, 100) == f"25.0 % (± {100 * math.sqrt(0.25 * 0.75 / 100):.1f})"


# -----------------------------------------------------------------------------
# The track's outputs as the report finds them: limited, incomplete, damaged


def track_outputs(folder, questions=None):
    """An <out> folder with an eval-telco.json of three models (every metric 0.5) and a stage-times.txt."""
    keys = ["bpb/telco", "mcq_acc_norm/telco", "rouge1/telco", "bleu4/telco", "mcq_acc_norm/heldout",
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
