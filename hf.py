"""
The HF checkpoint format, without any model code: config.json's fields as plain values (the names transformers 4.x
and 5.x write, and each family's own) and back, weight names where a family stores its own, and safetensors files
read (whole, or a process's rows alone) and written byte for byte as safetensors' save_file writes them, one tensor
at a time. model.py builds its ModelConfig from what read_config returns and checks the tensors' names and shapes
against the network.
"""
import json
import math
import os

import torch
from safetensors import safe_open

from files import commit, fsync, read_json, temporary_name

# HF model_type -> the architecture name transformers instantiates for it
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Llama-3.x, SmolLM2
    "qwen2": "Qwen2ForCausalLM",  # Qwen2, Qwen2.5
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",  # Gemma-3's text models (270M, 1B)
    "exaone": "ExaoneForCausalLM",  # EXAONE-3.x: its checkpoints' (and vLLM's) name; transformers 5 runs it as Llama
    "exaone4": "Exaone4ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
MAX_SHARD_SIZE = 5 * 2**30  # bytes per safetensors file, as transformers' save_pretrained
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # of the gated MLP: SwiGLU, and Gemma-3's GeGLU (tanh-approximated GELU)
ROPE_TYPES = ("default", "linear", "llama3")  # the RoPE scalings model.rope_inv_freq computes
# transformers' defaults where config.json has no value, when a family's differs from Llama's
DEFAULT_THETA = {"exaone": 500000.0, "gemma3_text": 1000000.0, "smollm3": 2000000.0}
TIED_BY_DEFAULT = ("gemma3_text", "smollm3")
# EXAONE-3.x names three fields as GPT-2 does (transformers maps them: ExaoneConfig.attribute_map) ...
EXAONE_FIELDS = {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
                 "activation_function": "hidden_act"}
# ... and its weights, which are Llama's network: (stored, ours), applied in this order (transformers 5 renames them
# the same way on loading, and back on saving: conversion_mapping.py).
EXAONE_WEIGHTS = (("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
                  ("transformer.ln_f.", "model.norm."), (".attn.attention.", ".self_attn."), (".out_proj.", ".o_proj."),
                  (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                  (".c_fc_0.", ".gate_proj."), (".c_fc_1.", ".up_proj."), (".c_proj.", ".down_proj."))
# The switches a family's config.json implies rather than states: an export must not lose one (config_to_hf)
IMPLIED = ("qkv_bias", "qk_norm", "activation", "norm_offset", "pre_norms", "post_norms", "embed_scale",
           "query_pre_attn_scalar", "rope_local_theta", "nope_layers", "logit_softcap")


def to_dtype(name):
    """A torch dtype from its name as config.json, a flag or str(dtype) spells it ("bfloat16", "torch.bfloat16");
    a torch.dtype passes through."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; supported: {', '.join(DTYPES)}")
    return DTYPES[key]


def check_settings(c: dict):
    """Refuse, with a one-line error, settings model.py cannot compute (c: a ModelConfig's fields)."""
    if c["model_type"] not in ARCHITECTURES:
        raise ValueError(f"model_type {c['model_type']!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    rope_type = (c["rope_scaling"] or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if c["n_heads"] % c["n_kv_heads"]:
        raise ValueError(f"n_heads={c['n_heads']} is not a multiple of n_kv_heads={c['n_kv_heads']}")
    if c["activation"] not in ACTIVATIONS:
        raise ValueError(f"hidden_act {c['activation']!r} is not supported; supported: {', '.join(ACTIVATIONS)}")


def stored_name(model_type, name):
    """A weight's name in a checkpoint's files, from ours (HF's Llama names): EXAONE-3.x's are its own."""
    if model_type == "exaone":
        for stored, ours in reversed(EXAONE_WEIGHTS):
            name = name.replace(ours, stored)
    return name


def our_name(model_type, stored):
    """The inverse of stored_name."""
    if model_type == "exaone":
        for theirs, ours in EXAONE_WEIGHTS:
            stored = stored.replace(theirs, ours)
    return stored


# -----------------------------------------------------------------------------
# config.json <-> plain values (the fields of model.ModelConfig)


def config_from_hf(hf: dict) -> dict:
    """The model's settings from an HF config.json, as written by transformers 4.x or 5.x."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    if model_type == "exaone":  # (a transformers 5 config has the usual names)
        hf = {**{ours: hf[theirs] for theirs, ours in EXAONE_FIELDS.items() if theirs in hf}, **hf}
    gemma = model_type == "gemma3_text"
    activation = (hf.get("hidden_activation") or "gelu_pytorch_tanh") if gemma else hf.get("hidden_act", "silu")
    if hf.get("mlp_bias") or (model_type != "qwen2" and hf.get("attention_bias")):
        raise ValueError("attention_bias / mlp_bias = true is not supported for this model_type")
    if gemma and hf.get("attn_logit_softcapping") is not None:  # (transformers' Gemma-3 would silently ignore it)
        raise ValueError("attn_logit_softcapping is not supported (Gemma-3 replaced it with q/k norms)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is not supported: a causal language model only")
    n_layers = hf["num_hidden_layers"]
    # RoPE: 5.x keeps everything in rope_parameters (Gemma-3: one per layer type); 4.x has rope_theta plus
    # rope_scaling, whose type was called "type" before "rope_type" (Gemma-3: plus rope_local_base_freq).
    rope = dict(hf.get("rope_parameters") or {})
    local = rope.pop("sliding_attention", None)
    rope = dict(rope.pop("full_attention", rope))
    default_theta = DEFAULT_THETA.get(model_type, 10000.0)
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
        rope["rope_theta"] = hf.get("rope_theta", default_theta)
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", default_theta)))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    scaling = rope if rope["rope_type"] != "default" else None
    local_theta = None
    if gemma:  # Gemma-3: its sliding-window layers have RoPE of their own base, unscaled
        local = local or {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise ValueError("a scaled RoPE on the sliding-window layers is not supported")
        local_theta = float(local["rope_theta"])
    # Sliding windows: Mistral slides on every layer when sliding_window is set; Qwen2/3 and SmolLM3 only with
    # use_sliding_window (Qwen: on layers from max_window_layers on); 5.x spells the layers out as layer_types.
    window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
    if model_type in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
        window, layer_types = None, None
    elif model_type in ("qwen2", "qwen3") and layer_types is None:
        n = hf.get("max_window_layers", 0)
        layer_types = ["sliding_attention" if i >= n else "full_attention" for i in range(n_layers)]
    elif model_type in ("gemma3_text", "exaone4") and layer_types is None and window is not None:
        # older configs give a period instead: every pattern-th layer global, the others sliding
        pattern = hf.get("sliding_window_pattern", 6 if gemma else 4)
        if not isinstance(pattern, int):
            raise ValueError(f"sliding_window_pattern {pattern!r} without layer_types is not supported")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    nope = None  # layers without RoPE
    if model_type == "smollm3":  # SmolLM3: no_rope_layers[i] is 1 where layer i HAS RoPE, 0 for a NoPE layer
        interval = hf.get("no_rope_layer_interval", 4)
        has_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        nope = [i for i in range(n_layers) if not has_rope[i]]
        if window is not None and layer_types is None:  # (its config slides on the NoPE layers)
            layer_types = ["sliding_attention" if i in nope else "full_attention" for i in range(n_layers)]
    elif model_type == "exaone4" and window is not None:  # EXAONE-4: RoPE on the sliding layers only
        nope = [i for i in range(n_layers) if layer_types[i] != "sliding_attention"]
    if layer_types is not None and "sliding_attention" not in layer_types and not gemma and model_type != "exaone4":
        window, layer_types = None, None  # (kept where the window matters: EXAONE-4's says which layers have
        # RoPE, and transformers' Gemma-3 needs one)
    n_heads = hf["num_attention_heads"]
    return dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT),
        qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v projections always carry a bias
        qk_norm=model_type in ("qwen3", "gemma3_text", "exaone4"),
        sliding_window=window,
        layer_types=list(layer_types) if layer_types is not None else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch."),
        activation=activation,
        norm_offset=1.0 if gemma else 0.0,
        pre_norms=model_type != "exaone4",
        post_norms=model_type in ("gemma3_text", "exaone4"),
        embed_scale=gemma,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma else None,
        rope_local_theta=local_theta,
        nope_layers=nope or None,
        logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
    )


def config_to_hf(c: dict) -> dict:
    """An HF config.json from the model's settings (4.x style: rope_theta + rope_scaling, which transformers 5.x
    also reads). A setting the family's config.json cannot say (a NoPE layer in a Llama) is an error."""
    model_type, n = c["model_type"], c["n_layers"]
    # (a model cut to its first n layers, as distill.py's --student-layers cuts one, keeps their types)
    c = {**c, "layer_types": c["layer_types"] and c["layer_types"][:n],
         "nope_layers": [i for i in c["nope_layers"] or () if i < n] or None}
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": c["vocab_size"],
        "hidden_size": c["dim"],
        "intermediate_size": c["hidden_dim"],
        "num_hidden_layers": n,
        "num_attention_heads": c["n_heads"],
        "num_key_value_heads": c["n_kv_heads"],
        "head_dim": c["head_dim"],
        "hidden_act": c["activation"],
        "rms_norm_eps": c["norm_eps"],
        "rope_theta": c["rope_theta"],
        "rope_scaling": c["rope_scaling"],
        "max_position_embeddings": c["max_seq_len"],
        "tie_word_embeddings": c["tie_embeddings"],
        "bos_token_id": c["bos_token_id"],
        "eos_token_id": c["eos_token_id"],
        "torch_dtype": c["dtype"],
        "attention_dropout": 0.0,
    }
    if c["pad_token_id"] is not None:  # (None leaves the family's default: SmolLM3's is past a small vocabulary)
        hf["pad_token_id"] = c["pad_token_id"]
    if model_type in ("llama", "exaone", "smollm3"):
        hf.update(attention_bias=False, mlp_bias=False)
    # Written even when None: MistralConfig would otherwise default to a 4096-token window.
    hf["sliding_window"] = c["sliding_window"]
    if c["layer_types"] is not None:
        hf["layer_types"] = c["layer_types"]
    if model_type in ("qwen2", "qwen3"):
        types = c["layer_types"] or ["sliding_attention"] * n
        sliding = [c["sliding_window"] is not None and t == "sliding_attention" for t in types]
        hf.update(use_sliding_window=any(sliding),
                  max_window_layers=sliding.index(True) if any(sliding) else n)
    if model_type in ("gemma3_text", "exaone4", "smollm3"):  # (left out, their configs would derive a pattern)
        hf["layer_types"] = c["layer_types"] or ["sliding_attention" if c["sliding_window"] else "full_attention"] * n
    if model_type == "smollm3":
        hf.update(use_sliding_window=c["sliding_window"] is not None,
                  no_rope_layers=[int(i not in (c["nope_layers"] or ())) for i in range(n)])
    if model_type == "gemma3_text":
        hf["hidden_activation"] = hf.pop("hidden_act")
        hf.update(query_pre_attn_scalar=c["query_pre_attn_scalar"], rope_local_base_freq=c["rope_local_theta"],
                  final_logit_softcapping=c["logit_softcap"], attn_logit_softcapping=None)
    if model_type == "exaone":  # EXAONE-3.x's own field names, as its checkpoints (and vLLM) have them
        hf = {next((t for t, o in EXAONE_FIELDS.items() if o == k), k): v for k, v in hf.items()}
    back = config_from_hf(hf)
    lost = [k for k in IMPLIED if back[k] != c[k]]
    if lost:
        raise ValueError(f"a {model_type} config.json cannot say {', '.join(f'{k}={c[k]!r}' for k in lost)}")
    return hf


def read_config(path):
    """The settings of an HF config.json; a file that is not JSON, or lacks a field, is an error naming it."""
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r}, which an HF model config must have") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def read_index(path):
    """(settings, {safetensors file: {key: shape}}) of an HF directory, from config.json and the files' headers (no
    tensor is read); keys by our names (stored_name gives the files'). The settings' dtype is the one the weights
    are stored in, when they agree on one."""
    config_path = os.path.join(path, "config.json")
    if str(path).endswith(".gguf"):
        raise ValueError(f"{path}: a GGUF file, not an HF directory; de-quantise it into one first "
                         "(transformers' from_pretrained(folder, gguf_file=...), as prepare_real_model.py does)")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: expected an HF model directory")
    settings = read_config(config_path)
    files, dtypes = {}, set()
    for file in safetensors_files(path):
        with open_safetensors(file) as f:
            files[file] = {}
            for key in f.keys():
                s = f.get_slice(key)
                files[file][our_name(settings["model_type"], key)] = tuple(s.get_shape())
                dtypes.add(s.get_dtype())
    floats = [name for name, code in SAFETENSORS_DTYPES.items() if code in dtypes and name.is_floating_point]
    if len(floats) == 1:
        settings["dtype"] = str(floats[0]).removeprefix("torch.")
    where = {key: file for file, keys in files.items() for key in keys}
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if settings["tie_embeddings"] and head in where and embedding in where and not same_bytes(
            (where[head], head), (where[embedding], stored_name(settings["model_type"], embedding))):
        raise ValueError(f"{path}: config.json says tie_word_embeddings, but the checkpoint's lm_head.weight is not "
                         "its embedding; set tie_word_embeddings to false to load the head it stores")
    return settings, files


def check_shapes(expected, shapes, source, model_type, tied):
    """Check a checkpoint's {key: shape} against the network's: an unexpected or missing key, or a wrong shape, is
    an error naming it. Returns the keys to skip: rotary inv_freq (recomputed) and a tied lm_head (some checkpoints
    store both anyway)."""
    if tied:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    ignored = []
    for key, shape in shapes.items():
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and tied):
            ignored.append(key)
        elif key not in expected:
            raise KeyError(f"{source}: unexpected key {stored_name(model_type, key)!r} for a {model_type} model")
        elif tuple(shape) != expected[key]:
            raise ValueError(f"{source}: {stored_name(model_type, key)} has shape {tuple(shape)}, the config expects "
                             f"{expected[key]}")
    missing = [stored_name(model_type, k) for k in expected if k not in shapes]
    if missing:
        raise KeyError(f"{source}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return ignored


def check_tokenizer(tokenizer, config, source):
    """A tokenizer that belongs to another model (a tokenizer.json copied from elsewhere) would train and
    export without a word: its ids must fit the model's vocabulary, and the model's own eos and bos ids must be
    tokens of it (its eos among the model's eos ids, when the model lists any)."""
    if tokenizer.n_vocab > config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.n_vocab} tokens but the model's vocab_size is "
                         f"{config.vocab_size}: they do not belong together")
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = [i for i in eos if i is not None]
    for name, ids in (("eos_token_id", eos), ("bos_token_id", [config.bos_token_id] * (
            config.bos_token_id is not None))):
        if any(i >= tokenizer.n_vocab for i in ids):
            raise ValueError(f"{source}: config.json's {name} {ids} is past the tokenizer's {tokenizer.n_vocab} "
                             "tokens: the tokenizer belongs to another model")
    if eos and tokenizer.eos_id is not None and tokenizer.eos_id not in eos:
        raise ValueError(f"{source}: the tokenizer's eos token (id {tokenizer.eos_id}) is not among config.json's "
                         f"eos_token_id {eos}: the tokenizer belongs to another model")


# -----------------------------------------------------------------------------
# safetensors files


def open_safetensors(file, device=None):
    """safe_open, with an error naming the file for a truncated or foreign one."""
    try:
        return safe_open(file, framework="pt", device=str(torch.device(device or "cpu")))
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{file}: not a readable safetensors file ({e}); was it copied completely?") from None


def safetensors_files(path):
    """The weight files of an HF directory: model.safetensors, or the shards its index lists."""
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


def same_bytes(a, b, chunk=1 << 24):
    """Whether two stored tensors, each (file, key), hold the same dtype, shape and bytes: compared a chunk at a
    time, never read whole."""
    (fa, ka), (fb, kb) = a, b
    (ea, da), (eb, db) = safetensors_header(fa), safetensors_header(fb)
    ta, tb = ea[ka], eb[kb]
    if (ta["dtype"], ta["shape"]) != (tb["dtype"], tb["shape"]):
        return False
    (sa, end), (sb, _) = ta["data_offsets"], tb["data_offsets"]
    with open(fa, "rb") as x, open(fb, "rb") as y:
        for offset in range(0, end - sa, chunk):
            n = min(chunk, end - sa - offset)
            x.seek(da + sa + offset)
            y.seek(db + sb + offset)
            if x.read(n) != y.read(n):
                return False
    return True


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


def write_weights(path, hf_config, specs, tensors, max_shard_size=MAX_SHARD_SIZE):
    """An HF model directory at path from tensors streamed in write_order(specs): the weight files (and their
    index above max_shard_size), then config.json (hf_config, as config_to_hf writes it). Each file is written
    under a temporary name, fsynced and renamed, config.json last; weight files of an earlier save that are not part
    of this one are removed. A failed write (a full disk) removes its temporary files: nothing holds the space."""
    os.makedirs(path, exist_ok=True)
    layout = shard_files(specs, max_shard_size)
    stored = {k: stored_name(hf_config["model_type"], k) for k in specs}  # (EXAONE-3.x's names are its own)
    layout = [(name, [stored[k] for k in keys]) for name, keys in layout]
    specs = {stored[k]: v for k, v in specs.items()}
    tensors = iter(tensors)
    files = {}  # final name -> its complete temporary file
    try:
        for name, keys in layout:
            files[name] = temporary_name(os.path.join(path, name))
            write_safetensors(files[name], specs, keys, (next(tensors) for _ in keys))
        if len(layout) > 1:
            total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in layout for k in keys}}
            files["model.safetensors.index.json"] = _write_json_tmp(path, "model.safetensors.index.json", index)
        files["config.json"] = _write_json_tmp(path, "config.json", hf_config)
    except BaseException:
        for tmp in files.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
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
