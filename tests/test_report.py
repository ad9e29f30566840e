"""report.py: the noise it prints beside each number is the textbook formula on a reference implementation's
scores (rouge_score per question, statistics.stdev), and an accuracy's standard error is sqrt(p (1 - p) / n)."""
import math
import statistics

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
