"""gpu_check.py --tiny end to end on the CPU, in a process of its own as a user runs it: every section gives numbers
(or says why not), speculative greedy output equals plain greedy output, and the bandwidth limit is the formula of
the JSON's own fields. Without a GPU and without --tiny it refuses in one line."""
import json
import math
import os
import subprocess
import sys

import pytest

from gpu_check import TINY, TINY_MODEL
from model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # (the CPU path, also on a machine with a GPU)


def run(*flags):
    return subprocess.run([sys.executable, "gpu_check.py", *flags], cwd=ROOT, env=CPU, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "x.json"
    done = run("--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_section_has_numbers_or_says_why_not(tiny):
    result, stdout = tiny
    assert result["tiny"] and result["device"] == "cpu"
    for section in ("train", "decode", "speculative", "sharded"):
        assert "failed" not in json.dumps(result[section]), result[section]
    eager = result["train"]["runs"]["eager"]
    assert eager["tokens_per_s"] > 0 and eager["step_s"] > 0 and eager["peak_mb"] > 0
    assert eager["mfu"] is None and math.isfinite(eager["last_loss"])  # (no peak FLOP/s for a CPU)
    assert eager["flops_per_step"] == ModelConfig(**TINY_MODEL).flops_per_token(TINY["seq_len"]) * \
        TINY["batch"] * TINY["seq_len"]
    assert "--tiny" in result["train"]["runs"]["compiled"]["skipped"]
    assert result["sharded"]["skipped"]
    # the printed table is the JSON's, one row per measurement, and says MFU is not defined here
    assert result["table"] in stdout
    for row in ("train step", "copy bandwidth", "batch-1 decoding, float32, eager", "batch-1 decoding, float32, "
                "compiled", "speculative greedy, gamma 4", "sharded teacher | skipped: no GPU", "MFU n/a"):
        assert row in result["table"]


def test_decoding_against_the_bandwidth_limit(tiny):
    d = tiny[0]["decode"]
    config = ModelConfig(**TINY_MODEL)
    # the bytes a decoding step reads: every weight but the embedding table's lookup (tied: it is the head), fp32
    assert d["params_read"] == config.num_params(embedding=True) and d["bytes_per_param"] == 4
    assert d["weight_bytes"] == d["params_read"] * d["bytes_per_param"]
    assert d["bandwidth_bytes_per_s"] == pytest.approx(2 * d["copy_bytes"] / d["copy_s"])  # read + written
    assert d["limit_tokens_per_s"] == pytest.approx(d["bandwidth_bytes_per_s"] / d["weight_bytes"])
    for mode in ("eager", "compiled"):
        r = d["runs"][mode]
        assert r["tokens_per_s"] > 0
        assert r["fraction_of_limit"] == pytest.approx(r["tokens_per_s"] / d["limit_tokens_per_s"])
    assert d["identical_compiled_eager"] == d["prompts"] == TINY["prompts"]  # fp32: the same greedy tokens


def test_speculative_equals_plain_greedy(tiny):
    s = tiny[0]["speculative"]
    assert s["random_pair"] and "not meaningful" in s["note"]
    assert s["compiled"] and s["draft_layers"] == TINY["draft_layers"] < s["target_layers"]
    # greedy speculative decoding is the target's greedy decoding, token for token, on every prompt
    assert s["identical_outputs"] == s["prompts"] == TINY["prompts"]
    assert s["tokens_plain"] == s["tokens_speculative"] == TINY["prompts"] * TINY["new_tokens"]
    assert s["plain_tokens_per_s"] > 0 and s["speculative_tokens_per_s"] > 0
    assert s["speedup"] == pytest.approx(s["speculative_tokens_per_s"] / s["plain_tokens_per_s"])
    assert 0 <= s["acceptance_rate"] <= 1 and s["cost_ratio"] > 0 and s["verify_cost"] > 0


def test_without_a_gpu_it_asks_for_tiny(tmp_path):
    done = run("--out", str(tmp_path / "x.json"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tiny" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "x.json").exists()
