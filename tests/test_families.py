"""Gemma-3, EXAONE-3.5, EXAONE-4.0 and SmolLM3 against transformers: tiny random checkpoints, every weight
randomised (norms included), load with transformers' logits (fp32 and bf16), decode through the KV cache as they
run whole and as transformers' greedy generate does, export back to files transformers loads, and go through the
chunked loss, the sharded loading and teacher, and memory.py's plan."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from conftest import REPO, free_port, randomize, saved_bytes
from memory import activation_bytes
from model import IGNORE, ModelConfig, Transformer
from parallel import load_rows
from tokenizer import Tokenizer

V = 300
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Windows of 5 tokens on sequences of 20: the window matters. This is sliding_window_pattern 3 (every third global).
SLIDING = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# family -> (transformers config class, overrides)
FAMILIES = {
    # Gemma-3 with every optional part on: logit soft-capping, a scaled RoPE on the global layers, its own attention
    # scale. hidden 72: sqrt(72) is not a bf16 number, so the embedding scale's rounding shows in bf16.
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=72, head_dim=24, sliding_window=5, layer_types=SLIDING,
                                        query_pre_attn_scalar=20, final_logit_softcapping=5.0, rope_parameters=dict(
                                            full_attention=dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                                            sliding_attention=dict(rope_type="default", rope_theta=1e4)))),
    # EXAONE-3.5: Llama's network under its own names, with Llama-3's RoPE scaling
    "exaone": ("ExaoneConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=1e6, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "exaone4": ("Exaone4Config", dict(sliding_window=5, layer_types=SLIDING)),  # global layers: no RoPE
    "exaone4-no-window": ("Exaone4Config", dict(sliding_window=None, layer_types=["full_attention"] * 4)),  # RoPE
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2)),  # layers 1 and 3 without RoPE
}


def make_hf(path, family, seed=0, **changes):
    """A tiny random transformers model of this family, saved to path; returns the transformers model."""
    config_cls, overrides = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides, **changes})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    randomize(hf, seed)
    hf.eval().save_pretrained(path)
    return hf


def tokens(T=20, B=2, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def read_config(path):
    with open(path / "config.json") as f:
        return json.load(f)


def write_config(path, config):
    with open(path / "config.json", "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family):
    """A checkpoint transformers wrote loads with transformers' fp32 logits."""
    hf = make_hf(tmp_path, family)
    idx = tokens()
    torch.testing.assert_close(logits_of(Transformer.from_pretrained(tmp_path), idx), logits_of(hf, idx),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_are_transformers_bits(tmp_path, family):
    """In bf16 the order and dtype of each operation show: (1 + w) applied in fp32 before the cast, the embedding
    scale rounded to bf16 before the product. The same operations in the same order give the same bits."""
    make_hf(tmp_path, family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                           attn_implementation="sdpa").eval()
    idx = tokens()
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16), idx),
                       logits_of(hf, idx))


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_forward(tmp_path, family):
    """A prefill, then one token at a time past the sliding window: the logits of the whole sequence at once."""
    make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    idx = tokens()
    full = logits_of(model, idx)
    model.setup_cache(max_batch_size=2, max_seq_len=32)
    with torch.no_grad():
        steps = [model(idx[:, :6], input_pos=torch.arange(6))]
        for t in range(6, 20):
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_equals_transformers_generate(tmp_path, family):
    """Greedy decoding on our KV cache gives the tokens of transformers' generate (its own cache), past the window."""
    hf = make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    prompt, n = tokens(T=8, B=1)[0].tolist(), 14
    model.setup_cache(max_batch_size=1, max_seq_len=len(prompt) + n)
    new = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
        for t in range(n):
            new.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([new[-1:]]), input_pos=torch.tensor([len(prompt) + t]))
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert new == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(tmp_path, family):
    """Our save_pretrained writes the tensors under the names transformers writes (EXAONE-3.5's transformer.h.N...)
    and a config.json that transformers loads into the same class, with the same logits; and so do we."""
    hf = make_hf(tmp_path / "hf", family)
    Transformer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    assert load_file(tmp_path / "ours" / "model.safetensors").keys() == \
        load_file(tmp_path / "hf" / "model.safetensors").keys()
    idx = tokens()
    torch.testing.assert_close(logits_of(back, idx), logits_of(hf, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(Transformer.from_pretrained(tmp_path / "ours"), idx), logits_of(hf, idx),
                               atol=1e-5, rtol=0)


def as_transformers4(config):
    """config.json as transformers 4.x wrote it: rope_theta + rope_scaling (its type under "type"), torch_dtype;
    Gemma-3's local base as rope_local_base_freq; a layer pattern as sliding_window_pattern instead of layer_types;
    EXAONE-3.5's GPT-2-style field names (its checkpoints' own)."""
    rope = config.pop("rope_parameters")
    if "full_attention" in rope:  # (5.x: one per layer type)
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope if rope["type"] != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    config.pop("_sliding_window_pattern", None)
    if config.get("layer_types") == SLIDING:
        del config["layer_types"]
        config["sliding_window_pattern"] = 3
    if config["model_type"] == "exaone":
        for old, new in (("num_layers", "num_hidden_layers"), ("layer_norm_epsilon", "rms_norm_eps"),
                         ("activation_function", "hidden_act")):
            config[old] = config.pop(new)
    return config


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers4_config(tmp_path, family):
    """The same checkpoint with a config.json in transformers 4.x's (and EXAONE-3.5's own) field names loads with
    the same logits."""
    hf = make_hf(tmp_path, family)
    write_config(tmp_path, as_transformers4(read_config(tmp_path)))
    idx = tokens()
    torch.testing.assert_close(logits_of(Transformer.from_pretrained(tmp_path), idx), logits_of(hf, idx),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_cross_entropy_on_the_logits(tmp_path, family):
    """Transformer.loss, a few positions at a time (Gemma's soft-capping inside each chunk), gives the loss and the
    gradients of cross-entropy on the whole batch's logits."""
    make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    model.loss_chunk_rows = 7  # several chunks, the last one shorter
    idx, targets = tokens(), tokens(seed=2)
    targets[:, :3] = IGNORE

    def loss_and_grads(loss):
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return loss.detach(), grads
    (loss, grads), (ref, ref_grads) = (loss_and_grads(model.loss(idx, targets)),
                                       loss_and_grads(F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(),
                                                                      reduction="sum")))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():  # (float32 rounding, summed in another order, scales with the gradient:
        # the embedding's reach 80 under transformers 5.25's initialisation)
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_param_count(tmp_path, family):
    """ModelConfig.num_params (MFU, memory plans) counts transformers' parameters, with and without the embedding."""
    hf = make_hf(tmp_path, family)
    config = Transformer.from_pretrained(tmp_path).config
    assert config.num_params() == hf.num_parameters()
    assert config.num_params(embedding=False) == hf.num_parameters(exclude_embeddings=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_rows_reads_each_familys_stored_tensors(tmp_path, family):
    """Sharded loading (parallel.load_rows, each process its own rows) finds every tensor under the family's
    stored name: the rows read are from_pretrained's."""
    make_hf(tmp_path, family)
    whole = Transformer.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = Transformer(whole.config)
    model.to_empty(device="cpu")
    if whole.config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_rows(model, tmp_path, lambda p: (p.data[1:], 1))  # rows 1.. of every tensor (a 1-D one: its elements)
    for (name, p), q in zip(model.named_parameters(), whole.parameters()):
        assert torch.equal(p[1:], q[1:]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_activations_are_what_autograd_saves(tmp_path, family):
    """memory.py's activation bytes for a forward pass are those of the tensors autograd saves (memory.plan builds
    on them), with each family's norms, windows and RoPE."""
    make_hf(tmp_path, family)
    model = Transformer.from_pretrained(tmp_path)
    B, T = 2, 20
    saved = saved_bytes(model, tokens(T=T, B=B))
    ropes = {block.self_attn.rope for block in model.model.layers} - {None}
    rope = len(ropes) * 2 * T * model.config.head_dim * 4  # cos and sin per RoPE base: per position, not token
    assert saved - rope == activation_bytes(model.config, B * T, 4, seq_len=T)


def test_sharded_teacher_and_losses_of_gemma3(tmp_path):
    """Gemma-3 (soft-capped head, scaled embedding, sliding windows) under torchrun with 2 processes: sharded
    loading, the chunked losses, the vocabulary-sharded teacher and the streaming export equal the plain paths
    (tests/sharded_worker.py). An odd vocabulary: the processes' slices differ in length."""
    for name, seed in (("model", 0), ("teacher", 1)):
        make_hf(tmp_path / name, "gemma3", seed=seed, vocab_size=V + 1)
    Tokenizer.train(["a small corpus for a tokenizer, " * 20], V).save_pretrained(tmp_path / "tokenizer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "tests", "sharded_worker.py"), str(tmp_path / "model"), str(tmp_path / "teacher"),
           str(tmp_path / "tokenizer"), str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("all equal") == 2


@pytest.mark.parametrize("change, message", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention is not supported"),
    (dict(hidden_activation="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e6), sliding_attention=dict(
        rope_type="linear", factor=2.0, rope_theta=1e4))), "scaled RoPE on the sliding-window layers"),
    (dict(layer_types=None, sliding_window_pattern="LLG"), "sliding_window_pattern 'LLG'"),
])
def test_what_cannot_be_reproduced_is_refused(tmp_path, change, message):
    """A Gemma-3 setting we would compute differently from transformers (or that transformers silently ignores) is
    a one-line error naming it, not a model with other logits."""
    make_hf(tmp_path, "gemma3")
    write_config(tmp_path, {k: v for k, v in {**read_config(tmp_path), **change}.items() if v is not None})
    with pytest.raises(ValueError, match=message) as error:
        Transformer.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)


def test_an_export_keeps_every_switch():
    """A setting the family's config.json cannot say (a Llama with NoPE layers) is an error, not an export that
    transformers would run differently."""
    with pytest.raises(ValueError, match="a llama config.json cannot say nope_layers=\\[1\\]"):
        ModelConfig(nope_layers=[1]).to_hf()
