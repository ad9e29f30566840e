"""
The HF checkpoint format, without any model code: config.json's fields as plain values (the names transformers 4.x
and 5.x write) and back, and safetensors files read (whole, or a process's rows alone) and written byte for byte as
safetensors' save_file writes them, one tensor at a time. model.py builds its ModelConfig from what read_config
returns and checks the tensors' names and shapes against the network.
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
}
MAX_SHARD_SIZE = 5 * 2**30  # bytes per safetensors file, as transformers' save_pretrained


# -----------------------------------------------------------------------------
# config.json <-> plain values (the fields of model.ModelConfig)


def config_from_hf(hf: dict) -> dict:
    """The model's settings from an HF config.json, as written by transformers 4.x or 5.x."""
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
    return dict(
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


def config_to_hf(c: dict) -> dict:
    """An HF config.json from the model's settings (4.x style: rope_theta + rope_scaling, which transformers 5.x
    also reads)."""
    hf = {
        "architectures": [ARCHITECTURES[c["model_type"]]],
        "model_type": c["model_type"],
        "vocab_size": c["vocab_size"],
        "hidden_size": c["dim"],
        "intermediate_size": c["hidden_dim"],
        "num_hidden_layers": c["n_layers"],
        "num_attention_heads": c["n_heads"],
        "num_key_value_heads": c["n_kv_heads"],
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
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
    if c["model_type"] == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    # Written even when None: MistralConfig would otherwise default to a 4096-token window.
    hf["sliding_window"] = c["sliding_window"]
    if c["layer_types"] is not None:
        hf["layer_types"] = c["layer_types"]
    if c["model_type"] in ("qwen2", "qwen3"):
        types = c["layer_types"] or ["sliding_attention"] * c["n_layers"]
        sliding = [c["sliding_window"] is not None and t == "sliding_attention" for t in types]
        hf.update(use_sliding_window=any(sliding),
                  max_window_layers=sliding.index(True) if any(sliding) else c["n_layers"])
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
    tensor is read). The settings' dtype is the one the weights are stored in, when they agree on one."""
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
                files[file][key] = tuple(s.get_shape())
                dtypes.add(s.get_dtype())
    floats = [name for name, code in SAFETENSORS_DTYPES.items() if code in dtypes and name.is_floating_point]
    if len(floats) == 1:
        settings["dtype"] = str(floats[0]).removeprefix("torch.")
    return settings, files


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
