"""memory.py's plan counts what model.py really keeps: the activation bytes it plans for a forward pass equal the
bytes of the tensors autograd saves for backward (counted with saved-tensor hooks), for every architecture switch.
What it measures keeps the whole run's peak when a stage starts a new one."""
import os

import pytest
import torch

import memory
from conftest import saved_bytes
from memory import activation_bytes, plan, shapes
from model import ModelConfig, Transformer

CONFIGS = {
    "llama": dict(),
    "qwen2 (q/k/v bias)": dict(model_type="qwen2", qkv_bias=True),
    "qwen3 (q/k norms, head_dim 24)": dict(model_type="qwen3", qk_norm=True, head_dim=24),
    "untied": dict(tie_embeddings=False),
}




@pytest.mark.parametrize("name", CONFIGS)
def test_planned_activations_are_what_autograd_saves(name):
    config = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=80, vocab_size=101,
                         max_seq_len=64, **CONFIGS[name])
    model = Transformer(config)
    B, T = 2, 16
    idx = torch.randint(0, 101, (B, T))
    rope = 2 * T * config.head_dim * 4  # cos and sin: per position, not per token of the batch
    assert saved_bytes(model, idx) - rope == activation_bytes(config, B * T, 4)


def test_plan_divides_the_sharded_state_by_the_processes():
    config = ModelConfig.from_preset("135m", vocab_size=49152)
    n = sum(p.numel() for p in Transformer(config).parameters())  # a tied head once
    assert sum(torch.Size(s).numel() for s in shapes(config).values()) == n == config.num_params()
    one, eight = plan(config, 1, 1, 256, torch.float32), plan(config, 8, 1, 256, torch.float32)
    assert one["load"][0] == pytest.approx(8 * eight["load"][0])
    # the step's sharded state (fp32 weights and AdamW's two moments at least: 12 bytes a parameter) is divided
    assert one["train step"][0] - eight["train step"][0] >= 12 * n * 7 / 8


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak through Linux's clear_refs")
def test_the_whole_runs_peak_outlives_a_stages_reset():
    """A stage's reset_peak starts its own peak; the whole run's (what the machine must find) keeps the one before."""
    cpu = torch.device("cpu")
    memory.reset_peak(cpu, trim=True)
    start = memory.current_mb(cpu)
    big = torch.ones(100 * 2**20)  # 400 MB, every page written
    del big
    memory.reset_peak(cpu, trim=True)
    assert memory.peak_mb(cpu) < start + 100
    assert memory.run_peak_mb(cpu) > start + 390
