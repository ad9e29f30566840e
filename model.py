"""
One decoder-only transformer for the Llama family: Llama-3.x, Qwen2 / Qwen2.5, Qwen3, Mistral and SmolLM2.

They differ in a handful of switches, all in ModelConfig: bias on q/k/v (Qwen2), RMSNorm on each head's q and k
before RoPE (Qwen3), a head_dim that is not dim / n_heads (Qwen3), sliding-window attention (Mistral), tied input and
output embeddings (small sizes), and the RoPE frequency scaling (Llama-3.1+). Module names follow the HF checkpoints
(`model.layers.0.self_attn.q_proj.weight` ...), so loading is a plain state-dict copy: no renaming, no q/k
permutation, because RoPE here uses HF's rotate-half layout.

    model = Transformer.from_pretrained("path/to/Qwen2.5-0.5B")     # HF directory, no transformers needed
    logits = model(idx)                                             # [B, T, vocab]
    model.setup_cache(max_batch_size=1, max_seq_len=512)            # static KV cache, gpt-fast style
    logits = model(idx[:, :5], input_pos=torch.arange(5))           # prefill, then one position at a time
    model.save_pretrained("out/run")                                # loads in transformers with the same logits
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint

from files import commit, fsync, read_json, temporary_name

# HF model_type -> the architecture name transformers instantiates for it
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Llama-3.x, SmolLM2
    "qwen2": "Qwen2ForCausalLM",  # Qwen2, Qwen2.5
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_dtype(name):
    """A torch dtype from its name as config.json, a flag or str(dtype) spells it ("bfloat16", "torch.bfloat16");
    a torch.dtype passes through."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; supported: {', '.join(DTYPES)}")
    return DTYPES[key]


# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 512  # hidden_size
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8  # < n_heads: grouped-query attention (Ainslie et al. 2023)
    head_dim: int = 0  # 0: dim // n_heads (Qwen3 sets it explicitly)
    hidden_dim: int = 1536  # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_seq_len: int = 2048  # max_position_embeddings
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None  # Mistral; applies to the layers marked "sliding_attention"
    layer_types: list | None = None  # per layer "full_attention" | "sliding_attention"; None: all full
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    dtype: str = "float32"  # the dtype the weights are stored in

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def window(self, layer: int) -> int | None:
        """The sliding-window size of this layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """From an HF config.json, as written by transformers 4.x or 5.x."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
        if hf.get("mlp_bias") or (model_type != "qwen2" and hf.get("attention_bias")):
            raise ValueError("attention_bias / mlp_bias = true is not supported for this model_type")
        # RoPE: 5.x keeps everything in rope_parameters; 4.x has rope_theta plus rope_scaling, whose type was
        # called "type" before "rope_type".
        rope = dict(hf.get("rope_parameters") or {})
        if not rope:
            rope = dict(hf.get("rope_scaling") or {})
            rope["rope_theta"] = hf.get("rope_theta", 10000.0)
        rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
        rope.pop("type", None)
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        scaling = rope if rope["rope_type"] != "default" else None
        # Sliding windows: Mistral slides on every layer when sliding_window is set; Qwen2/3 only with
        # use_sliding_window, on layers from max_window_layers on (5.x spells that out as layer_types).
        window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window, layer_types = None, None
        elif model_type in ("qwen2", "qwen3") and layer_types is None:
            n = hf.get("max_window_layers", 0)
            layer_types = ["sliding_attention" if i >= n else "full_attention" for i in range(hf["num_hidden_layers"])]
        if layer_types is not None and "sliding_attention" not in layer_types:
            window, layer_types = None, None
        n_heads = hf["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v projections always carry a bias
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            layer_types=list(layer_types) if layer_types is not None else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch."),
        )

    def to_hf(self) -> dict:
        """An HF config.json (4.x style: rope_theta + rope_scaling, which transformers 5.x also reads)."""
        hf = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.dtype,
            "attention_dropout": 0.0,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        # Written even when None: MistralConfig would otherwise default to a 4096-token window.
        hf["sliding_window"] = self.sliding_window
        if self.layer_types is not None:
            hf["layer_types"] = self.layer_types
        if self.model_type in ("qwen2", "qwen3"):
            sliding = [self.window(i) is not None for i in range(self.n_layers)]
            hf.update(use_sliding_window=any(sliding),
                      max_window_layers=sliding.index(True) if any(sliding) else self.n_layers)
        return hf

    # Parameter and FLOP counts, analytic, so MFU can be computed without building the model.
    def block_matmul_params(self) -> int:
        """Weights of one block's matmuls: q, k, v, o projections and the SwiGLU MLP's three."""
        d, hd = self.dim, self.head_dim
        return d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d + 3 * d * self.hidden_dim

    def num_params(self, embedding: bool = True) -> int:
        d, hd = self.dim, self.head_dim
        block = self.block_matmul_params() + 2 * d  # + two RMSNorms
        block += hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        block += 2 * hd if self.qk_norm else 0
        n = self.n_layers * block + d  # + final norm
        n += 0 if self.tie_embeddings else self.vocab_size * d  # lm_head
        return n + (self.vocab_size * d if embedding else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 N over the N weights that take part in a matmul, the
        lm_head included, the embedding lookup not (Kaplan et al. 2020), plus 12 L H d_head T for the attention
        scores and their weighted sum (PaLM, Chowdhery et al. 2022, appendix B; full T x T, as is customary)."""
        n = self.n_layers * self.block_matmul_params() + self.vocab_size * self.dim
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Shapes for models trained from scratch. vocab_size comes from the tokenizer (from_preset(name, vocab_size=...)).
# "tiny" and "small" train on a 2-core laptop CPU in minutes: the workshop's draft and target (the draft is shallow:
# a decoding step costs about the same per layer, so fewer layers make a cheaper draft). The others are the shapes
# of SmolLM2-135M / SmolLM2-360M and Llama-3.2-1B, for GPUs.
PRESETS = {
    "tiny": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seq_len=1024, tie_embeddings=True),
    "small": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, hidden_dim=768, max_seq_len=1024, tie_embeddings=True),
    "135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, max_seq_len=2048,
                 tie_embeddings=True, rope_theta=100000.0),
    "360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, max_seq_len=2048,
                 tie_embeddings=True, rope_theta=100000.0),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, max_seq_len=4096,
               tie_embeddings=True, rope_theta=500000.0),
}


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in fp32 and cast back before the weight, as HF does, so bf16
    outputs match transformers bit for bit."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies theta^(-2i/d) (Su et al. 2021), with the configured frequency scaling."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":  # position interpolation (Chen et al. 2023): positions / factor
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        # Llama 3.1: keep high frequencies (wavelength < original_ctx / high_freq_factor), divide low frequencies
        # (wavelength > original_ctx / low_freq_factor) by factor, interpolate smoothly in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + d/2) of each head, HF's layout: no interleaving, so HF q/k weights load unpermuted."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """A static cache of keys and values, [B, n_kv_heads, max_seq_len, head_dim], written at absolute positions.
    Speculative decoding relies on this: positions of rejected draft tokens are simply overwritten next round."""

    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        B = k.shape[0]
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B], self.v[:B]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.window(layer)
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        # SDPA picks flash / memory-efficient kernels on GPU; enable_gqa shares each k/v head across
        # n_heads / n_kv_heads query heads without materialising copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The training loss without the whole batch's logits

# Logits of one chunk of the loss: 2^23 fp32 values are 32 MB (55 positions of Qwen2.5's 151,936 tokens, 170 of
# SmolLM2's 49,152), against 5 GB for a 4 x 2048 micro-batch at once. A distillation loss makes about ten tensors of
# that size per chunk, so larger chunks would not be much faster, only larger.
LOGITS_PER_CHUNK = 2**23


def loss_chunk_rows(vocab_size):
    """Positions per chunk of the training loss: at most LOGITS_PER_CHUNK logits exist at once."""
    return max(1, LOGITS_PER_CHUNK // vocab_size)


class ChunkedLoss(torch.autograd.Function):
    """sum over chunks of loss_fn(h[rows] @ W^T, rows): the loss of the head's logits, one chunk of rows at a time.

    The logits are the largest tensor of a training step (micro-batch x seq-len x vocab, in fp32 for the loss), and
    autograd would keep all of them for backward. Here each chunk's gradient with respect to its logits is taken
    as soon as its loss is, and turned at once into the gradients of h and W (the chain rule through logits = h W^T:
    dh = g W, dW = g^T h), as Liger-Kernel's fused linear cross-entropy does. Backward only scales them by the
    incoming gradient: only one chunk of logits ever exists, and none is recomputed."""

    @staticmethod
    def forward(ctx, h, weight, loss_fn, chunks):
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # summed over chunks in fp32
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for rows in chunks:
            hc = h[rows]
            with torch.enable_grad():
                logits = F.linear(hc, weight).requires_grad_()
                loss = loss_fn(logits, rows)
            g, = torch.autograd.grad(loss, logits)
            grad_h[rows] = g @ weight
            grad_w.addmm_(g.T.float(), hc.float())
            total += loss.detach()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # (scaled in place: W's gradient is as large as W, and backward runs once)
        grad_h, grad_w = ctx.saved_tensors
        return grad_h.mul_(grad_total), grad_w.mul_(grad_total), None, None


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.dim),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layers)),
            norm=RMSNorm(config.dim, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.max_batch_size, self.max_seq_len = 0, 0
        # Masks for cached decoding, [max_seq_len, max_seq_len], made by setup_cache; one per distinct window.
        self.cache_masks = {}
        self.loss_chunk_rows = loss_chunk_rows(config.vocab_size)

    def init_weights(self, std: float = 0.02):
        """Initialise for training from scratch: normal(0, std) matmuls and embeddings, zero biases, unit norms,
        output projections scaled by 1/sqrt(2 n_layers) (GPT-2) so the residual stream's variance stays O(1)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype=None):
        """Allocate a static KV cache in every layer (in the model's device, and its dtype unless a compute dtype is
        given: FSDP's mixed precision computes in bf16 over fp32 weights). Call before forward with input_pos; call
        again to resize."""
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.config.max_seq_len}")
        w = self.lm_head.weight
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=w.device).tril()
        self.cache_masks = {}
        for i, block in enumerate(self.model.layers):
            attn = block.self_attn
            attn.kv_cache = KVCache(max_batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype or w.dtype,
                                    w.device)
            if attn.window not in self.cache_masks:
                self.cache_masks[attn.window] = causal if attn.window is None else causal.triu(-attn.window + 1)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, *, loss_fn=None, mask=None,
                return_hidden=False, filled=None) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab]. Without input_pos: positions 0..T-1, causal attention, no
        cache. With input_pos (the T absolute positions of idx): reads and writes the KV cache.

        filled [B, max_seq_len] (with input_pos): False at the cache columns of each row's left padding, which no
        query reads (see speculative.generate_batch). A row's tokens then sit at positions shifted by its padding;
        RoPE makes attention depend only on the distance between positions, so the shift changes nothing.

        With loss_fn (training): the summed loss over the positions where mask [B, T] is True (all without a mask),
        computed without the logits of the whole batch: see ChunkedLoss. return_hidden: the final normalised hidden
        states [B, T, dim] instead of logits (a teacher whose head is applied chunk by chunk in the student's loss)."""
        B, T = idx.shape
        if input_pos is None:
            pos = torch.arange(T, device=idx.device)
        else:
            if self.max_seq_len == 0:
                raise RuntimeError("forward with input_pos needs a KV cache: call setup_cache() first")
            pos = input_pos
        # cos/sin in fp32, then in the activations' dtype, as HF computes them
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.model.embed_tokens(idx)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        masks = {}
        for block in self.model.layers:
            window = block.self_attn.window
            if window not in masks:
                masks[window] = self._mask(window, pos, input_pos is not None, filled)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, masks[window], input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, masks[window], input_pos)
        h = self.model.norm(x)
        if return_hidden:
            return h
        if loss_fn is None:
            return self.lm_head(h)
        # The positions to score, split into the same number of chunks on every process (a sharded teacher's head
        # in loss_fn is a collective, so every process must call it equally often).
        rows = torch.arange(B * T, device=idx.device) if mask is None else mask.flatten().nonzero().squeeze(1)
        chunks = rows.tensor_split(-(-B * T // self.loss_chunk_rows))
        return ChunkedLoss.apply(h.flatten(0, 1), self.lm_head.weight, loss_fn, chunks)

    def _mask(self, window, pos, cached, filled=None):
        """Boolean attention mask (True = attend), or None for plain causal attention (SDPA's is_causal)."""
        if cached and filled is not None:  # per row: not its padding, but a padding query sees itself (no NaN)
            S = self.max_seq_len
            itself = torch.arange(S, device=pos.device) == pos[:, None]
            return (self.cache_masks[window][pos] & (filled[:, None, :S] | itself))[:, None]
        if cached:  # the query rows at pos, over the whole static cache
            return self.cache_masks[window][pos][None, None]
        if window is None:
            return None
        # sliding window (Mistral): query i sees keys i - window < j <= i
        return torch.ones(len(pos), len(pos), dtype=torch.bool, device=pos.device).tril().triu(-window + 1)

    # -------------------------------------------------------------------------
    # HF-format checkpoints

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        """Load an HF directory: config.json plus model.safetensors, or shards listed in
        model.safetensors.index.json. dtype: a torch dtype or name; None keeps the stored dtype. Tensors are read
        straight to `device` and assigned into a model built on the meta device: memory for one copy, not two."""
        config, files = read_checkpoint(path)
        dtype = None if dtype is None else to_dtype(dtype)
        state = {}
        for file, keys in files.items():
            with open_safetensors(file, device) as f:
                for key in keys:
                    t = f.get_tensor(key)
                    state[key] = t.to(dtype) if dtype is not None else t
        return cls.from_state_dict(config, state, device=device, source=path)

    @classmethod
    def from_state_dict(cls, config, state, device=None, dtype=None, source="state dict") -> "Transformer":
        """A model whose parameters ARE the given tensors (HF key names), checked key by key and shape by shape.
        config.dtype stays what it says (from_pretrained: the dtype the checkpoint is stored in, which exports
        write back, even when the model is loaded in another)."""
        for key in check_keys(config, {k: v.shape for k, v in state.items()}, source):
            del state[key]
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(config).to(model.lm_head.weight.device)
        return model

    def load_rows(self, path, owned):
        """Fill this model's parameters from the HF directory at path, each with only the rows it holds: owned(p)
        -> (the tensor p keeps, its first row in the full tensor). A process of a sharded model reads its own rows
        of each tensor from the files (read_rows: those bytes alone), so loading needs its share of the model, not
        the whole. Parameters keep their dtype (the stored one is converted a slice at a time)."""
        config, files = read_checkpoint(path)
        where = {key: file for file, keys in files.items() for key in keys}
        headers = {file: safetensors_header(file) for file in files}
        for name, p in self.named_parameters():  # a tied lm_head is the embedding: read once
            local, start = owned(p)
            with torch.no_grad():
                read_rows(where[name], headers[where[name]], name, start, start + len(local), into=local)
        self.inv_freq = rope_inv_freq(config).to(self.inv_freq.device)

    def save_pretrained(self, path, max_shard_size: int = 5 * 2**30):
        """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors shards with
        model.safetensors.index.json above max_shard_size bytes), as transformers writes them: tied weights once.
        Files go to a temporary name first and are renamed, so an interrupted save never leaves a broken model."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        self.config.dtype = str(self.lm_head.weight.dtype).removeprefix("torch.")
        specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        order = write_order(specs, max_shard_size)
        write_weights(path, self.config, specs, (state[k] for k in order), max_shard_size)


# -----------------------------------------------------------------------------
# Reading and writing HF directories: config.json and safetensors files


def read_config(path):
    """ModelConfig from an HF config.json; a file that is not JSON, or lacks a field, is an error naming it."""
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r}, which an HF model config must have") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def read_checkpoint(path):
    """(config, {safetensors file: [keys]}) of an HF directory, every key and shape checked against the config
    from the files' headers (no tensor is read yet). The config's dtype is the one the weights are stored in."""
    config_path = os.path.join(path, "config.json")
    if str(path).endswith(".gguf"):
        raise ValueError(f"{path}: a GGUF file, not an HF directory; de-quantise it into one first "
                         "(transformers' from_pretrained(folder, gguf_file=...), as prepare_real_model.py does)")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: expected an HF model directory")
    config = read_config(config_path)
    files, shapes, dtypes = {}, {}, set()
    for file in _safetensors_files(path):
        with open_safetensors(file) as f:
            files[file] = list(f.keys())
            for key in files[file]:
                s = f.get_slice(key)
                shapes[key] = tuple(s.get_shape())
                dtypes.add(s.get_dtype())
    ignored = check_keys(config, shapes, path)
    files = {file: [k for k in keys if k not in ignored] for file, keys in files.items()}
    floats = [name for name, code in SAFETENSORS_DTYPES.items() if code in dtypes and name.is_floating_point]
    if len(floats) == 1:
        config.dtype = str(floats[0]).removeprefix("torch.")
    return config, files


def check_keys(config, shapes, source):
    """Check a checkpoint's {key: shape} against the model of config: an unexpected or missing key, or a wrong
    shape, is an error naming it. Returns the keys to skip: rotary inv_freq (recomputed) and a tied lm_head (some
    checkpoints store both anyway)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    ignored = []
    for key, shape in shapes.items():
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_embeddings):
            ignored.append(key)
        elif key not in expected:
            raise KeyError(f"{source}: unexpected key {key!r} for a {config.model_type} model")
        elif tuple(shape) != expected[key]:
            raise ValueError(f"{source}: {key} has shape {tuple(shape)}, the config expects {expected[key]}")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise KeyError(f"{source}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return ignored


def open_safetensors(file, device=None):
    """safe_open, with an error naming the file for a truncated or foreign one."""
    try:
        return safe_open(file, framework="pt", device=str(torch.device(device or "cpu")))
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{file}: not a readable safetensors file ({e}); was it copied completely?") from None


def _safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = read_json(index)["weight_map"]
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} is listed in {index} but does not exist")
        return files
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


# The safetensors format (a little-endian u64 header length, a JSON header of each tensor's dtype, shape and byte
# offsets, then the raw bytes), written here tensor by tensor so that a model is never in memory twice. The layout is
# the one safetensors' save_file writes, byte for byte: tensors sorted by dtype (in its enum's order, widest first)
# then by name, a compact header padded with spaces to 8 bytes.
SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                      torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
                      torch.float64: "F64", torch.int64: "I64"}


def shard_files(specs, max_shard_size):
    """{key: (shape, dtype)} in state-dict order -> [(file name, [keys in the order they are written])]: shards of
    at most max_shard_size bytes (a larger tensor alone), named as transformers names them."""
    shards, size = [[]], 0
    for key, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    rank = list(SAFETENSORS_DTYPES.values())
    return [(name, sorted(keys, key=lambda k: (-rank.index(SAFETENSORS_DTYPES[specs[k][1]]), k)))
            for name, keys in zip(names, shards)]


def safetensors_header(file):
    """The JSON header of a safetensors file ({key: {"dtype", "shape", "data_offsets"}}), and where data starts."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def read_rows(file, header, key, start, stop, into):
    """Copy rows [start, stop) of tensor `key` of a safetensors file into the tensor `into`. A row-major tensor's
    rows are contiguous bytes: one positioned read of them and nothing else, straight into `into` when the dtypes
    agree, else through one slice in the stored dtype (no memory map, whose pages would count as the process's)."""
    entries, data = header
    entry = entries[key]
    shape, dtype = entry["shape"], {v: k for k, v in SAFETENSORS_DTYPES.items()}[entry["dtype"]]
    row = math.prod(shape[1:]) * dtype.itemsize
    direct = into.dtype == dtype and into.is_contiguous() and into.device.type == "cpu"
    out = into if direct else torch.empty(into.shape, dtype=dtype)
    with open(file, "rb") as f:
        f.seek(data + entry["data_offsets"][0] + start * row)
        f.readinto(out.view(-1).view(torch.uint8).numpy())
    if not direct:
        into.copy_(out)


def write_order(specs, max_shard_size):
    """Every key in the order write_weights consumes the tensors."""
    return [key for _, keys in shard_files(specs, max_shard_size) for key in keys]


def write_safetensors(path, specs, keys, tensors):
    """Stream tensors (an iterable, in the order of keys) into a safetensors file at path, one at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        shape, dtype = specs[key]
        end = offset + math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key, t in zip(keys, tensors):
            if (tuple(t.shape), t.dtype) != specs[key]:
                raise ValueError(f"{key}: got {tuple(t.shape)} {t.dtype}, expected {specs[key]}")
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)


def write_weights(path, config, specs, tensors, max_shard_size=5 * 2**30):
    """An HF model directory at path from tensors streamed in write_order(specs): the weight files (and their
    index above max_shard_size), then config.json. Each file is written under a temporary name, fsynced and
    renamed, config.json last; weight files of an earlier save that are not part of this one are removed."""
    os.makedirs(path, exist_ok=True)
    layout = shard_files(specs, max_shard_size)
    tensors = iter(tensors)
    files = {}  # final name -> its complete temporary file
    for name, keys in layout:
        files[name] = temporary_name(os.path.join(path, name))
        write_safetensors(files[name], specs, keys, (next(tensors) for _ in keys))
    if len(layout) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: name for name, keys in layout for k in keys}}
        files["model.safetensors.index.json"] = _write_json_tmp(path, "model.safetensors.index.json", index)
    files["config.json"] = _write_json_tmp(path, "config.json", config.to_hf())
    for name, tmp in files.items():
        fsync(tmp)
        commit(tmp, os.path.join(path, name))
    for name in os.listdir(path):
        if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")) \
                and name not in files:
            os.remove(os.path.join(path, name))


def _write_json_tmp(folder, name, obj):
    """obj as JSON in a temporary file for folder/name; returns its path (commit renames it into place)."""
    tmp = temporary_name(os.path.join(folder, name))
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return tmp
