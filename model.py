"""
One decoder-only transformer for the Llama family: Llama-3.x, Qwen2 / Qwen2.5, Qwen3, Mistral, SmolLM2 / SmolLM3,
Gemma-3 and EXAONE-3.5 / 4.0.

They differ in a handful of switches, all in ModelConfig: q/k/v bias (Qwen2), q/k RMSNorm (Qwen3, Gemma-3, EXAONE-4),
sliding windows (Mistral, Gemma-3, EXAONE-4), layers without RoPE (SmolLM3, EXAONE-4), norms after attention and MLP
(Gemma-3, EXAONE-4), Gemma-3's (1 + w) norms, embedding scale, GeGLU and attention scale, tied embeddings, RoPE
scaling (Llama-3.1+). Module names are the HF checkpoints' (`model.layers.0.self_attn.q_proj.weight` ...; hf.py
renames EXAONE-3.5's own), and RoPE uses HF's rotate-half layout: loading is a state-dict copy, q/k unpermuted.

    model = Transformer.from_pretrained("path/to/Qwen2.5-0.5B")     # HF directory, no transformers needed
    logits = model(idx)                                             # [B, T, vocab]
    model.setup_cache(max_batch_size=1, max_seq_len=512)            # static KV cache, gpt-fast style
    logits = model(idx[:, :5], input_pos=torch.arange(5))           # prefill, then one position at a time
    model.save_pretrained("out/run")                                # loads in transformers with the same logits
    loss = model.loss(idx, targets)                                 # training: summed over targets != IGNORE

Read top to bottom: the config, the building blocks (RMSNorm, RoPE, KV cache, linear layers, attention, MLP,
block), the Transformer (its training loss in chunks is loss.py's). Reading and writing the files themselves
(config.json's field names, safetensors) is hf.py's; from_pretrained and save_pretrained are thin doors to it.
"""

import math
import os
import platform
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# (to_dtype and check_tokenizer are hf.py's; train.py, sft.py and the others import them from here)
from hf import (MAX_SHARD_SIZE, check_settings, check_shapes, check_tokenizer, config_from_hf, config_to_hf,  # noqa
                open_safetensors, read_index, stored_name, to_dtype, write_order, write_weights)
# (IGNORE and loss_chunk_rows are loss.py's; data.py and memory.py import them from here)
from loss import IGNORE, ChunkedLoss, loss_chunk_rows  # noqa


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
    pad_token_id: int | None = None  # (None: the family's default)
    dtype: str = "float32"  # the dtype the weights are stored in
    # Gemma-3, EXAONE-4 and SmolLM3 (the defaults are Llama's)
    activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU), "gelu_pytorch_tanh" (Gemma-3's GeGLU)
    norm_offset: float = 0.0  # Gemma-3: RMSNorm scales by (1 + w), its weights stored around 0
    pre_norms: bool = True  # RMSNorm on the inputs of attention and MLP (all but EXAONE-4)
    post_norms: bool = False  # RMSNorm on their outputs, before the residual add (Gemma-3, EXAONE-4)
    embed_scale: bool = False  # Gemma-3: embeddings multiplied by sqrt(dim)
    query_pre_attn_scalar: float | None = None  # Gemma-3: scores scaled by this^-0.5, not head_dim^-0.5
    rope_local_theta: float | None = None  # Gemma-3: the RoPE base of its sliding-window layers (unscaled)
    nope_layers: list | None = None  # layers without RoPE (NoPE): SmolLM3's, EXAONE-4's global ones
    logit_softcap: float | None = None  # cap * tanh(logits / cap) on the output (final_logit_softcapping)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        check_settings(vars(self))  # (what this file cannot compute is refused)

    def window(self, layer: int) -> int | None:
        """The sliding-window size of this layer, or None for full causal attention."""
        full = self.layer_types is not None and self.layer_types[layer] != "sliding_attention"
        return None if full else self.sliding_window

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":  # from an HF config.json, by transformers 4.x or 5.x (hf.py)
        return cls(**config_from_hf(hf))

    def to_hf(self) -> dict:  # an HF config.json (hf.config_to_hf)
        return config_to_hf(asdict(self))

    # Parameter and FLOP counts, analytic, so MFU can be computed without building the model.
    def block_matmul_params(self) -> int:
        """Weights of one block's matmuls: q, k, v, o projections and the SwiGLU MLP's three."""
        d, hd = self.dim, self.head_dim
        return d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d + 3 * d * self.hidden_dim

    def num_params(self, embedding: bool = True) -> int:
        d, hd = self.dim, self.head_dim
        block = self.block_matmul_params() + 2 * (self.pre_norms + self.post_norms) * d  # + the RMSNorms
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


# Shapes for models trained from scratch, vocab_size from the tokenizer (from_preset(name, vocab_size=...)). "tiny"
# and "small" train on a 2-core laptop CPU in minutes: the workshop's draft and target (a shallow draft: a decoding
# step costs about the same per layer). The others: SmolLM2-135M's, SmolLM2-360M's and Llama-3.2-1B's, for GPUs.
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

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma-3: (1 + w) RMSNorm (its w is stored around 0), multiplied in fp32, cast after
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """RoPE inverse frequencies theta^(-2i/d) (Su et al. 2021), with the configured frequency scaling; local:
    Gemma-3's sliding-window layers' own base, unscaled."""
    hd = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = {} if local else config.rope_scaling or {}
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


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + d/2) of each head, HF's layout: no interleaving, so HF q/k weights load unpermuted."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (x * cos + rotate_half(x) * sin)


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
        self.k[:B, :, input_pos], self.v[:B, :, input_pos] = k, v
        return self.k[:B], self.v[:B]


# oneDNN's linear kernels for inference on x86 CPUs (see Linear); bench.py sets it False to measure MKL's.
ONEDNN = torch.backends.mkldnn.is_available() and platform.machine() in ("x86_64", "AMD64")


class Linear(nn.Linear):
    """nn.Linear, computed without autograd on an x86 CPU by oneDNN, not by F.linear's MKL sgemm, whose cost grows
    with the rows: on the AMD EPYC of docs/benchmarks.md a pass over 2 tokens (speculative verification) cost 1.7
    decode steps, through oneDNN 1.1-1.2, and a step is 1.3x faster. Outputs differ in the last bits only. For
    decoding (pack), from a copy of the weight in oneDNN's blocked layout, made once instead of at every call: a
    decode step 1.1x (float32) and 1.3x (bfloat16; batched float32 too) faster again, the same outputs bit for bit."""

    packed = None  # pack(): (the weight in oneDNN's layout, the weight it was made from, that weight's version)

    def pack(self, rows=8):  # (the rows the layout is made for: 8 measured best for 1-8 rows; 1 gains no fp32 time)
        w = self.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows), self.weight, w._version

    def __getstate__(self):  # a copy (copy.deepcopy: gpu_check's draft) is unpacked: oneDNN's layout is opaque to it
        return {**super().__getstate__(), "packed": None}

    def forward(self, x):
        if ONEDNN and x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            packed, weight, version = self.packed or (None, None, None)
            if weight is self.weight and version == weight._version and x.dtype == weight.dtype:  # (not stale)
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            if x.dtype == torch.float32:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


def pack(model):
    """Ready for decoding on an x86 CPU (speculative.load): every Linear's weight also in oneDNN's layout, which holds
    the weights' memory once more. Elsewhere, or in another dtype, nothing changes."""
    w = model.lm_head.weight
    if ONEDNN and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
        for m in model.modules():
            if isinstance(m, Linear):
                m.pack()
    return model


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.window(layer)
        # RoPE: None in a NoPE layer (SmolLM3's, EXAONE-4's global ones), "local" in Gemma-3's sliding layers (their
        # own base, rope_local_theta), else "global" (rope_theta with its scaling)
        self.rope = None if layer in (config.nope_layers or ()) else \
            "local" if config.rope_local_theta is not None and self.window is not None else "global"
        # Gemma-3: scores scaled by query_pre_attn_scalar^-0.5 (None: SDPA's head_dim^-0.5)
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None
        self.q_proj = Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        if config.qk_norm:  # Qwen3, Gemma-3, EXAONE-4: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_offset)
        self.kv_cache = None

    def forward(self, x, rope, mask, input_pos=None):
        """rope: (cos, sin) of this layer's RoPE at the query positions (None: a NoPE layer)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        if rope is not None:  # (a NoPE layer sees no positions: causal masking alone orders its tokens)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if input_pos is not None:  # the cache's columns the mask covers: those written so far (see Transformer._mask)
            k, v = (t[:, :, :mask.shape[-1]] for t in self.kv_cache.update(input_pos, k, v))
        # SDPA picks flash / memory-efficient kernels on GPU; enable_gqa shares each k/v head across
        # n_heads / n_kv_heads query heads without materialising copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Gated feed-forward (Shazeer 2020): down(act(gate(x)) * up(x)); SwiGLU, or GeGLU with Gemma-3's
    tanh-approximated GELU (gelu_pytorch_tanh)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = Linear(config.hidden_dim, config.dim, bias=False)
        self.gelu = config.activation == "gelu_pytorch_tanh"

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """Residual block, under HF's module names. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)), where
    post_attention_layernorm is the norm BEFORE the MLP. With post-norms, attention's and the MLP's outputs are
    normalised too before they are added: Gemma-3 has both ("sandwich" norms), EXAONE-4 the post-norms alone."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        def norm():
            return RMSNorm(config.dim, config.norm_eps, config.norm_offset)
        self.post_norms = config.post_norms
        self.input_layernorm = norm() if config.pre_norms else None
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = norm()  # (with post-norms: on attention's output)
        if config.post_norms:
            self.pre_feedforward_layernorm = norm() if config.pre_norms else None
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, input_pos=None):
        if not self.post_norms:
            x = x + self.self_attn(self.input_layernorm(x), rope, mask, input_pos)
            return x + self.mlp(self.post_attention_layernorm(x))
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        x = x + self.post_attention_layernorm(self.self_attn(h, rope, mask, input_pos))
        h = x if self.pre_feedforward_layernorm is None else self.pre_feedforward_layernorm(x)
        return x + self.post_feedforward_layernorm(self.mlp(h))


def softcap(logits, cap):
    """Logit soft-capping (Gemma-2/3's final_logit_softcapping): cap * tanh(logits / cap), in (-cap, cap)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


class Head(Linear):
    """The output layer: logits = h W^T, soft-capped by its `cap` where the config has one."""

    def forward(self, h):
        return softcap(super().forward(h), self.cap)

    # The training loss's two halves of a chunk (ChunkedLoss), methods of the head so that a head split by
    # vocabulary over processes (parallel.VocabShardedHead) can exchange its logits and their gradients.
    def loss(self, h, loss_fn, chunks, vocab=None):  # vocab: the ids scored (Transformer.loss), None: all
        weight = self.weight if vocab is None else self.weight[vocab]
        return ChunkedLoss.apply(h, weight, loss_fn, chunks, self, torch.is_grad_enabled())

    def chunk_logits(self, h, weight):
        return F.linear(h, weight)

    def chunk_backward(self, g, h, weight, grad_w):
        """The chain rule through logits = h W^T: adds dW = g^T h to grad_w (fp32), returns dh = g W."""
        grad_w.addmm_(g.T.float(), h.float())
        return g @ weight


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.dim),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layers)),
            norm=RMSNorm(config.dim, config.norm_eps, config.norm_offset),
        ))
        self.lm_head = Head(config.dim, config.vocab_size, bias=False)
        self.lm_head.cap = config.logit_softcap
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", None, persistent=False)
        self.register_buffer("inv_freq_local", None, persistent=False)  # Gemma-3's sliding-window layers'
        self.reset_rope()
        self.activation_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.max_batch_size, self.max_seq_len = 0, 0
        self.cache_masks = {}  # for cached decoding, [max_seq_len, max_seq_len], by setup_cache: one per window
        self.loss_chunk_rows = loss_chunk_rows(config.vocab_size)

    def init_weights(self, std: float = 0.02):
        """Initialise for training from scratch: normal(0, std) matmuls and embeddings, zero biases, unit norms,
        output projections scaled by 1/sqrt(2 n_layers) (GPT-2) so the residual stream's variance stays O(1)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.constant_(p, 1.0 - self.config.norm_offset)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)
        self.reset_rope()

    def reset_rope(self):
        """(Re)compute the RoPE frequencies, buffers rather than weights, on the weights' device."""
        device = self.lm_head.weight.device
        self.inv_freq = rope_inv_freq(self.config).to(device)
        if self.config.rope_local_theta is not None:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)

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
        for attn in (block.self_attn for block in self.model.layers):
            attn.kv_cache = KVCache(max_batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype or w.dtype,
                                    w.device)
            if attn.window not in self.cache_masks:
                self.cache_masks[attn.window] = causal if attn.window is None else causal.triu(-attn.window + 1)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, unpadded=None) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab]. Without input_pos: positions 0..T-1, causal attention, no
        cache. With input_pos (the T absolute positions of idx): reads and writes the KV cache.

        unpadded [B, max_seq_len] (with input_pos): True at the cache columns that hold a row's real tokens, False
        at those of its left padding, which no query reads (see speculative.generate_batch). A row's tokens then
        sit at positions shifted by its padding; RoPE makes attention depend only on the distance between
        positions, so the shift changes nothing."""
        return self.lm_head(self._trunk(idx, input_pos, unpadded))

    def hidden(self, idx: torch.Tensor, input_pos=None, unpadded=None) -> torch.Tensor:
        """forward's final normalised hidden states [B, T, dim], before the output layer: for the positions whose
        logits are read (a prefill's last, a choice's tokens in eval.py, a teacher's chunk in distill.py) alone."""
        return self._trunk(idx, input_pos, unpadded)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, loss_fn=None, vocab=None) -> torch.Tensor:
        """The next-token loss of training: summed over the positions whose target [B, T] is not IGNORE, computed
        without the logits of the whole batch (see ChunkedLoss). By default the cross-entropy against targets;
        loss_fn(logits, rows) -> summed loss replaces it (distillation, bits per byte), rows being the chunk's
        positions in the flattened [B * T] batch. vocab (ids): logits over those alone (a draft's reduced head)."""
        B, T = idx.shape
        y = targets.flatten()
        if loss_fn is None:
            def loss_fn(logits, rows):
                return F.cross_entropy(logits.float(), y[rows], reduction="sum")

        def capped(logits, rows):  # soft-capping inside the chunk: its gradient goes through the tanh
            return loss_fn(softcap(logits, self.config.logit_softcap), rows)
        h = self._trunk(idx)
        # The positions to score, split into the same number of chunks on every process (a sharded teacher's head
        # in loss_fn is a collective, so every process must call it equally often).
        rows = (y != IGNORE).nonzero().squeeze(1)
        chunks = rows.tensor_split(-(-B * T // self.loss_chunk_rows))
        return self.lm_head.loss(h.flatten(0, 1), capped, chunks, vocab)

    def _trunk(self, idx, input_pos=None, unpadded=None):
        """Embedding, blocks and final norm: the hidden states that forward, hidden and loss go on from."""
        B, T = idx.shape
        if input_pos is not None and self.max_seq_len == 0:
            raise RuntimeError("forward with input_pos needs a KV cache: call setup_cache() first")
        pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos
        x = self.model.embed_tokens(idx)
        # Gemma-3: its embedding is also its head, so inputs are scaled up by sqrt(dim) to the residual stream's
        # size; the factor rounded to the model's dtype before the product, as transformers does
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.dim ** 0.5, device=x.device).to(x.dtype)
        masks, ropes = {}, {None: None}  # per window and per RoPE, made once for the layers that share them
        for block in self.model.layers:
            window, rope = block.self_attn.window, block.self_attn.rope
            if window not in masks:
                masks[window] = self._mask(window, pos, input_pos is not None, unpadded)
            if rope not in ropes:  # cos/sin in fp32, then in the activations' dtype, as HF computes them
                freqs = pos.float()[:, None] * (self.inv_freq_local if rope == "local" else self.inv_freq)[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                ropes[rope] = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, ropes[rope], masks[window], input_pos, use_reentrant=False)
            else:
                x = block(x, ropes[rope], masks[window], input_pos)
        return self.model.norm(x)

    def _mask(self, window, pos, cached, unpadded=None):
        """Boolean attention mask (True = attend), or None for plain causal attention (SDPA's is_causal). Cached:
        the query rows at pos over the cache's first S columns, those written so far, which are all attention reads
        (not the whole static cache); all of them under torch.compile (static shapes: one graph for every step)."""
        S = self.max_seq_len if torch.compiler.is_compiling() or not cached else int(pos.max()) + 1
        if cached and unpadded is not None:  # per row: not its padding, but a padding query sees itself (no NaN)
            itself = torch.arange(S, device=pos.device) == pos[:, None]
            return (self.cache_masks[window][pos, :S] & (unpadded[:, None, :S] | itself))[:, None]
        if cached:
            return self.cache_masks[window][pos, :S][None, None]
        if window is None:
            return None
        # sliding window (Mistral; Gemma-3's and EXAONE-4's local layers): query i sees keys i - window < j <= i
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
                    t = f.get_tensor(stored_name(config.model_type, key))
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
        model.reset_rope()
        return model

    def save_pretrained(self, path, max_shard_size: int = MAX_SHARD_SIZE):
        """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors shards with
        model.safetensors.index.json above max_shard_size bytes), as transformers writes them: tied weights once,
        config.json's dtype the weights' own. Files go to a temporary name first and are renamed, so an
        interrupted save never leaves a broken model."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        config = replace(self.config, dtype=str(self.lm_head.weight.dtype).removeprefix("torch."))
        specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        order = write_order(specs, max_shard_size)
        write_weights(path, config.to_hf(), specs, (state[k] for k in order), max_shard_size)


def preset_model(preset, vocab_size, max_seq_len, bos_token_id, eos_token_id, seed):
    """A new model of a preset shape (PRESETS), randomly initialised from `seed`: a from-scratch base
    (train.py) or a new draft (distill.py)."""
    config = ModelConfig.from_preset(preset, vocab_size=vocab_size, max_seq_len=max_seq_len,
                                     bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights()
    return model


# -----------------------------------------------------------------------------
# A checkpoint's tensors against the network


def read_checkpoint(path):
    """(config, {safetensors file: [keys]}) of an HF directory, every key and shape checked against the config
    from the files' headers (no tensor is read yet). The config's dtype is the one the weights are stored in."""
    settings, files = read_index(path)
    try:
        config = ModelConfig(**settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from None
    ignored = check_keys(config, {k: s for keys in files.values() for k, s in keys.items()}, path)
    return config, {file: [k for k in keys if k not in ignored] for file, keys in files.items()}


def check_keys(config, shapes, source):
    """hf.check_shapes against the tensors of the model of config (built on the meta device: no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    return check_shapes(expected, shapes, source, config.model_type, config.tie_embeddings)
