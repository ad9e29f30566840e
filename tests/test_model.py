"""model.py against transformers: tiny random HF checkpoints of every supported family load with the same logits,
export back to HF with the same logits, and KV-cache decoding reproduces the full forward pass."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from conftest import randomize
from torch.utils.flop_counter import FlopCounterMode

import model as model_py
from model import ModelConfig, Transformer

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)

# family -> (transformers config class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3-rope": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "linear-rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=100000.0))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),  # 4 x 24 != 64
    "mistral": ("MistralConfig", dict(sliding_window=5, tie_word_embeddings=False)),
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}


def make_hf(path, family, **save_kwargs):
    """A tiny random transformers model of this family, saved to path; returns the transformers model."""
    config_cls, overrides = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    randomize(hf)
    hf.eval().save_pretrained(path, **save_kwargs)
    return hf


def tokens(T=16, B=2, vocab=96, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family):
    hf = make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    idx = tokens()
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


@pytest.mark.skipif(not model_py.ONEDNN, reason="oneDNN's kernel serves x86 CPUs only")
def test_inference_runs_every_linear_through_onednn_with_transformers_logits(tmp_path):
    """Without autograd, in fp32 on an x86 CPU, every linear layer runs oneDNN's kernel (model.Linear, 7 per block
    and the head), and the logits are still transformers' (whose layers run F.linear); with autograd, F.linear."""
    hf = make_hf(tmp_path, "qwen2")  # (q/k/v biases: the kernel's bias argument)
    model = Transformer.from_pretrained(tmp_path)
    idx = tokens()
    with torch.profiler.profile() as prof:
        ours = our_logits(model, idx)
    calls = [e.name for e in prof.events()]
    assert calls.count("mkldnn::_linear_pointwise") == 7 * 3 + 1 and "aten::linear" not in calls
    torch.testing.assert_close(ours, hf_logits(hf, idx), atol=1e-4, rtol=0)
    with torch.profiler.profile() as prof:
        model(idx).sum().backward()
    assert "mkldnn::_linear_pointwise" not in [e.name for e in prof.events()]
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not model_py.ONEDNN, reason="oneDNN's kernel serves x86 CPUs only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_decode_with_transformers_logits(tmp_path, dtype):
    """model.pack (speculative.load's): every linear layer reads its weight in oneDNN's layout, and a prefill and
    cached steps of 1 and several tokens still give transformers' logits (bf16: within bf16's rounding, here 0.14 as
    unpacked; transformers' own bf16 logits are 0.17 from its fp32 ones)."""
    hf = make_hf(tmp_path, "qwen2").to(dtype)
    model = model_py.pack(Transformer.from_pretrained(tmp_path, dtype=dtype))
    assert all(m.packed is not None for m in model.modules() if isinstance(m, model_py.Linear))
    idx = tokens(T=12, B=1)
    model.setup_cache(max_batch_size=1, max_seq_len=16)
    with torch.no_grad(), torch.profiler.profile() as prof:
        ours = torch.cat([model(idx[:, a:b], input_pos=torch.arange(a, b)) for a, b in ((0, 8), (8, 9), (9, 12))], 1)
    assert "aten::linear" not in [e.name for e in prof.events()]
    tol = 1e-4 if dtype == torch.float32 else 0.25
    torch.testing.assert_close(ours.float(), hf_logits(hf, idx).float(), atol=tol, rtol=0)


@pytest.mark.skipif(not model_py.ONEDNN, reason="oneDNN's kernel serves x86 CPUs only")
def test_a_packed_weight_changed_after_packing_is_read_as_changed(tmp_path):
    """A packed copy is of the weight as it was: changed in place or replaced afterwards, the layer computes with
    the weight it has now (x W^T + b), not with the stale copy."""
    layer = model_py.Linear(8, 4)
    layer.pack()
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer.weight.mul_(2)
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
        layer.weight = torch.nn.Parameter(torch.randn(4, 8))
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


@pytest.mark.skipif(not model_py.ONEDNN, reason="oneDNN's kernel serves x86 CPUs only")
def test_a_packed_model_can_be_deep_copied(tmp_path):
    """copy.deepcopy of a packed model (gpu_check.py truncates a copy of its loaded target into a draft): the copy
    has transformers' logits, and its layers compute with their own weights, not the original's."""
    hf = make_hf(tmp_path, "qwen2")
    model = model_py.pack(Transformer.from_pretrained(tmp_path))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    idx = tokens()
    torch.testing.assert_close(our_logits(twin, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_the_loss_without_autograd_computes_no_gradient(tmp_path, monkeypatch):
    """Validation and bits per byte call the chunked loss under no_grad: the loss is transformers' cross-entropy,
    and the head's gradient matmuls (each as large as the logits', ChunkedLoss) are not run."""
    hf = make_hf(tmp_path, "llama3-rope")
    model = Transformer.from_pretrained(tmp_path)
    idx = tokens()
    monkeypatch.setattr(model_py.Head, "chunk_backward", lambda *args: pytest.fail("a gradient was computed"))
    with torch.no_grad():
        ours = model.loss(idx[:, :-1], idx[:, 1:])
        ref = F.cross_entropy(hf(idx[:, :-1]).logits.flatten(0, 1), idx[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_sharded_checkpoint(tmp_path):
    hf = make_hf(tmp_path, "llama3-rope", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    model = Transformer.from_pretrained(tmp_path)
    idx = tokens()
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_transformers4_config(tmp_path):
    """transformers 4.x wrote rope_theta + rope_scaling (with the older "type" key) and torch_dtype."""
    hf = make_hf(tmp_path, "llama3-rope")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    idx = tokens()
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(tmp_path, family):
    """Our save_pretrained loads in transformers with the same logits (tied weights written once)."""
    hf = make_hf(tmp_path / "hf", family)
    model = Transformer.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    idx = tokens()
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not model.config.tie_embeddings)


def test_export_sharded_and_bf16(tmp_path):
    config = ModelConfig.from_preset("tiny", vocab_size=96)
    model = Transformer(config)
    model.init_weights()
    randomize(model)  # norms too
    model.save_pretrained(tmp_path, max_shard_size=50_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    assert not os.path.exists(tmp_path / "model.safetensors")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = tokens()
    torch.testing.assert_close(hf_logits(back, idx), our_logits(model, idx), atol=1e-4, rtol=0)
    # saving again unsharded replaces the shards instead of leaving a stale index behind
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back = Transformer.from_pretrained(tmp_path)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert Transformer.from_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_save_pretrained_leaves_the_models_config_as_it_was(tmp_path):
    """config.json says the dtype the weights are written in; the model's own config (the dtype its checkpoint was
    stored in, which a later export writes back) is not changed by saving."""
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=96)).to(torch.bfloat16)
    assert model.config.dtype == "float32"
    model.save_pretrained(tmp_path)
    assert model.config.dtype == "float32"
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_streamed_files_are_those_of_safetensors_save_file(tmp_path):
    """save_pretrained streams each tensor into its file (model.write_safetensors); the bytes are those safetensors'
    save_file writes from the whole state dict, for one file and for shards, in fp32 and in mixed dtypes."""
    config = ModelConfig.from_preset("tiny", vocab_size=96, tie_embeddings=False)
    model = Transformer(config)
    randomize(model)
    model.model.norm.to(torch.bfloat16)  # two dtypes in one file: safetensors orders them by dtype, then by name
    for max_shard_size in (5 * 2**30, 200_000):
        out = tmp_path / str(max_shard_size)
        model.save_pretrained(out, max_shard_size=max_shard_size)
        names = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        assert (len(names) > 1) == (max_shard_size < 2**30)
        state = model.state_dict()
        for name in names:
            ours = (out / name).read_bytes()
            keys = list(load_file(out / name))
            save_file({k: state[k] for k in keys}, tmp_path / "reference", metadata={"format": "pt"})
            assert ours == (tmp_path / "reference").read_bytes(), name


@pytest.mark.parametrize("family", ["llama3-rope", "qwen2", "qwen3", "mistral", "qwen2-sliding"])
def test_kv_cache_decoding_equals_full_forward(tmp_path, family):
    make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    idx = tokens(T=20)
    full = our_logits(model, idx)
    model.setup_cache(max_batch_size=2, max_seq_len=32)
    with torch.no_grad():
        steps = [model(idx[:, :6], input_pos=torch.arange(6))]  # prefill
        for t in range(6, 20):  # then one token at a time
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["smollm2", "qwen2", "mistral"])
def test_left_padded_batch_decoding_equals_transformers_per_row(tmp_path, family):
    """Batched generation left-pads prompts of different lengths to one width and hides the padding through
    `unpadded`: each row's logits, at the prefill and at every cached step after it, are transformers' logits of that
    row alone, unpadded (its positions shifted by the padding, which RoPE does not see; Mistral's sliding window
    counts cache columns, which the padding does not break)."""
    hf = make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    rows = [tokens(T=T, B=1, seed=T)[0].tolist() for T in (5, 9, 12)]
    W, steps = 12, 6
    idx = torch.tensor([[0] * (W - len(r)) + r for r in rows])
    model.setup_cache(max_batch_size=3, max_seq_len=24)
    unpadded = torch.arange(24)[None] >= torch.tensor([W - len(r) for r in rows])[:, None]
    new = torch.randint(0, 96, (3, steps), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = [model(idx, input_pos=torch.arange(W), unpadded=unpadded)[:, -1:]]
        for t in range(steps):
            out.append(model(new[:, t:t + 1], input_pos=torch.tensor([W + t]), unpadded=unpadded))
    out = torch.cat(out, dim=1)  # the logits after each row's prompt, then after each new token
    for b, r in enumerate(rows):
        theirs = hf_logits(hf, torch.tensor([r + new[b].tolist()]))[0, len(r) - 1:]
        torch.testing.assert_close(out[b], theirs, atol=1e-4, rtol=0)


def test_kv_cache_overwrites_rejected_positions(tmp_path):
    """Speculative decoding writes draft tokens at positions it may later reject; rewriting those positions with
    the right tokens must give the same logits as if the wrong ones had never been there."""
    make_hf(tmp_path, "qwen2")
    model = Transformer.from_pretrained(tmp_path)
    idx = tokens(T=12, B=1)
    full = our_logits(model, idx)
    model.setup_cache(max_batch_size=1, max_seq_len=16)
    with torch.no_grad():
        model(idx[:, :8], input_pos=torch.arange(8))
        model((idx[:, 8:12] + 1) % 96, input_pos=torch.arange(8, 12))  # "draft" tokens, all wrong
        out = model(idx[:, 8:12], input_pos=torch.arange(8, 12))  # rewritten
    torch.testing.assert_close(out, full[:, 8:12], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_param_count(tmp_path, family):
    hf = make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.num_params() == hf.num_parameters()
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    assert model.config.num_params(embedding=False) == hf.num_parameters(exclude_embeddings=True)


@pytest.mark.parametrize("family", ["llama", "qwen3", "smollm2"])
def test_flops_per_token(tmp_path, family):
    """The 6 N matmul part against torch's FLOP counter over one forward + backward. (The counter does not see
    CPU SDPA kernels; the attention term 12 L H d_head T is PaLM's formula.)"""
    make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    B, T = 2, 16
    with FlopCounterMode(display=False) as counter:
        model(tokens(T=T, B=B)).sum().backward()
    assert counter.get_total_flops() == model.config.flops_per_token(seq_len=0) * B * T


@pytest.mark.parametrize("name", ["tiny", "small", "135m", "360m", "1b"])
def test_presets(name):
    config = ModelConfig.from_preset(name, vocab_size=49152)
    with torch.device("meta"):
        model = Transformer(config)
    assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_presets_sizes():
    # the shapes of the public models they are named after (SmolLM2-135M/360M, Llama-3.2-1B)
    assert round(ModelConfig.from_preset("135m", vocab_size=49152).num_params() / 1e6) == 135
    assert round(ModelConfig.from_preset("360m", vocab_size=49152).num_params() / 1e6) == 362
    assert round(ModelConfig.from_preset("1b", vocab_size=128256).num_params() / 1e9, 2) == 1.24


# -----------------------------------------------------------------------------
# Bad inputs: clear errors that name the file and the key


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_missing_weights(tmp_path):
    make_hf(tmp_path, "llama")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def edit_config(path, **changes):
    with open(path / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(config, f)


def test_unknown_model_type(tmp_path):
    make_hf(tmp_path, "llama")
    edit_config(tmp_path, model_type="gpt2")
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama, qwen2, qwen3, mistral"):
        Transformer.from_pretrained(tmp_path)


def test_unsupported_rope(tmp_path):
    make_hf(tmp_path, "llama")
    edit_config(tmp_path, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0))
    with pytest.raises(ValueError, match="'yarn' is not supported; supported: default, linear, llama3"):
        Transformer.from_pretrained(tmp_path)


def test_shape_mismatch(tmp_path):
    make_hf(tmp_path, "llama")
    edit_config(tmp_path, intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight has shape \(64, 80\), the config expects \(64, 96\)"):
        Transformer.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys(tmp_path):
    make_hf(tmp_path, "llama")
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(tmp_path)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(80, 64)
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="unexpected key 'model.layers.1.mlp.extra.weight'"):
        Transformer.from_pretrained(tmp_path)


def test_decode_without_cache_is_an_error():
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=96))
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(tokens(T=1), input_pos=torch.tensor([0]))
