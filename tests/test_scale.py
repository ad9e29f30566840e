"""Memory that scales with the number of processes, with nothing else changed: sharded loading, the sharded teacher
(split by heads, or FSDP2's with a single k/v head), the chunked losses and the streaming export give the weights, losses, gradients and files of the plain paths
(tests/sharded_worker.py, under torchrun with 1 and 2 processes)."""

import os
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import REPO, free_port, randomize
from tokenizer import Tokenizer

# An odd vocabulary, so the two processes' shards of the embedding differ in length (51 and 50 rows)
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
CASES = {
    "smollm2-tied-bf16": ("LlamaConfig", dict(tie_word_embeddings=True), torch.bfloat16),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False), torch.float32),
    # fewer k/v heads than processes: the teacher's blocks stay FSDP2's, not split by heads
    "qwen2-one-kv-head": ("Qwen2Config", dict(tie_word_embeddings=False, num_key_value_heads=1), torch.float32),
}
TEACHER = {"qwen2-one-kv-head": "FSDPTransformer"}  # (under 2 processes; the others: TensorParallelTeacher)


def checkpoint(path, case, seed=0):
    config_cls, overrides, dtype = CASES[case]
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**{**TINY, **overrides}),
                                                       dtype=torch.float32)
    randomize(hf, seed)
    hf.to(dtype).save_pretrained(path)


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_paths_equal_the_plain_ones(tmp_path, case, nproc):
    checkpoint(tmp_path / "model", case)
    checkpoint(tmp_path / "teacher", case, seed=1)
    Tokenizer.train(["a small corpus for a tokenizer, " * 20], 300).save_pretrained(tmp_path / "tokenizer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), os.path.join(REPO, "tests", "sharded_worker.py"), str(tmp_path / "model"),
           str(tmp_path / "teacher"), str(tmp_path / "tokenizer"), str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("all equal") == nproc
    if nproc == 2:
        assert f"(teacher: {TEACHER.get(case, 'TensorParallelTeacher')})" in result.stdout
