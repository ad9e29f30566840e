"""Every mistake a user can make fails loudly and loses nothing; resuming never unpickles.

Each test here is one fault that a user met (concurrency, a wrong flag, a damaged file, an interrupted run), with
the behaviour the project promises instead: a correct result, or a one-line error that names the file, line or flag
(no traceback), and earlier results left as they were."""
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, kill_after_step, losses, run_train, train_cmd

from model import ModelConfig, Transformer
from tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # (many subprocess runs: the second pytest call, see pytest.ini)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=kw.pop("cwd", REPO), env=ENV, capture_output=True, text=True, timeout=300, **kw)


def tree_hash(folder):
    """A hash of every file under folder (names and bytes): equal before and after means nothing was touched."""
    h = hashlib.sha256()
    for parent, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(parent, name)
            h.update(os.path.relpath(path, folder).encode() + b"\0" + open(path, "rb").read())
    return h.hexdigest()


def assert_user_error(p, *patterns):
    """A non-zero exit with a message matching every pattern, and no Python traceback."""
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    for pattern in patterns:
        assert re.search(pattern, out), (pattern, out[-2000:])


# -----------------------------------------------------------------------------
# The output directory: never the input, one run at a time, resumed only as it was started


def test_out_equal_to_or_inside_the_input_is_refused(tiny_run, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(tiny_run / "init", init)
    before = tree_hash(init)
    for out in (init, init / "sub"):
        p = run_train(train_cmd(tiny_run, out, "--init-from", str(init)), ok=False)
        assert_user_error(p, r"--out .* (the same directory as|inside) --init-from")
    assert tree_hash(init) == before


def test_two_runs_on_one_out_never_interleave(tiny_run, tmp_path):
    """Started together on one --out: one runs, the other is refused; the run's metrics hold each step once."""
    out = tmp_path / "out"
    cmd = train_cmd(tiny_run, out, "--max-steps", "8")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, [err[-1500:] for _, _, err in results]
    loser = next(err for p, _, err in results if p.returncode != 0)
    assert re.search(r"in use by a run that is still going|already holds a run", loser), loser[-2000:]
    assert [r["step"] for r in losses(out)[1] if "loss" in r] == list(range(1, 9))


def test_a_stale_lock_is_taken_over_with_a_message(tiny_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("pid 999999 on some-host\n")  # left by a process that was killed
    p = run_train(train_cmd(tiny_run, out, "--max-steps", "2"))
    assert "taking over the lock left by a run that ended without releasing it (pid 999999 on some-host)" in \
        p.stdout + p.stderr


def test_resume_refuses_changed_settings_and_allows_cadence(tiny_run, tmp_path):
    out = tmp_path / "out"
    run_train(train_cmd(tiny_run, out, "--max-steps", "6"))
    done = losses(out)[0]
    for flags, name in [(["--replay-ratio", "0.25"], "--replay-ratio"), (["--seq-len", "16"], "--seq-len"),
                        (["--lr", "1e-3"], "--lr"), (["--seed", "7"], "--seed"),
                        (["--batch-size", "8"], "--batch-size"), (["--domain", "general"], "--domain")]:
        p = run_train(train_cmd(tiny_run, out, "--max-steps", "6", *flags, "--resume"), ok=False)
        assert_user_error(p, rf"started with other settings: .*{name} ")
        assert losses(out)[0] == done  # nothing redone, nothing lost
    # eval and save cadence, micro-batches and the number of processes change nothing learned
    run_train(train_cmd(tiny_run, out, "--max-steps", "6", "--eval-every", "1", "--save-every", "3",
                        "--micro-batch-size", "2", "--resume", nproc=2))
    resumed = losses(out)[0]
    assert list(resumed) == list(done)
    for step in done:
        assert resumed[step] == pytest.approx(done[step], abs=1e-4), step


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tiny_run, tmp_path):
    run_train(train_cmd(tiny_run, tmp_path / "full", "--max-steps", "8", "--save-every", "0"))
    out = tmp_path / "killed"
    logged = kill_after_step(train_cmd(tiny_run, out, "--max-steps", "8", "--save-every", "0"), out, 1, cwd=REPO,
                             env=ENV)
    assert 1 <= max(logged) < 8 and not (out / "checkpoints").exists()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the row the kill cut short
    run_train(train_cmd(tiny_run, out, "--max-steps", "8", "--save-every", "0", "--resume"))
    full, resumed = losses(tmp_path / "full")[0], losses(out)[0]
    assert list(resumed) == list(range(1, 9))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


# -----------------------------------------------------------------------------
# Durable: fsync before every rename

FSYNC_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)
    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)
    os.fsync, os.replace = fsync, replace
    import train
    from checkpoint import save_checkpoint
    from model import ModelConfig, Transformer
    from parallel import setup_distributed, shard_model
    from tokenizer import Tokenizer
    rank, world, device = setup_distributed()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300, n_layers=1))
    model.init_weights()
    out = sys.argv[1]
    model.save_pretrained(out)                                                    # an export
    Tokenizer.train(["some text to learn merges from " * 20], 300).save_pretrained(out)
    sharded = shard_model(model, device, torch.float32)
    save_checkpoint(sharded, train.make_optimizer(sharded, 0.0, device), out, 1, 2)   # a checkpoint
    def synced_before(path, i):
        return any(e == ("fsync", path) for e in events[:i])
    for i, e in enumerate(events):
        if e[0] != "replace":
            continue
        src, dst = e[1], e[2]
        files = [os.path.join(src, f) for f in os.listdir(dst)] if os.path.isdir(dst) else [src]
        for f in files:
            assert synced_before(os.path.realpath(f), i), f"{f} renamed to {dst} before it was fsynced"
        assert ("fsync", os.path.dirname(dst)) in events[i:], f"the rename to {dst} was never made durable"
    print("all", sum(e[0] == "replace" for e in events), "renames fsynced")
""")


def test_exports_and_checkpoints_are_fsynced_before_they_are_renamed(tmp_path):
    p = run([sys.executable, "-c", FSYNC_SCRIPT, str(tmp_path / "out")])
    assert p.returncode == 0 and "renames fsynced" in p.stdout, p.stdout + p.stderr[-3000:]


# -----------------------------------------------------------------------------
# Resuming never unpickles


class Payload:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_anything_in_the_checkpoint(tiny_run, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "PWNED"
    run_train(train_cmd(tiny_run, out, "--max-steps", "6"))
    payload = pickle.dumps(Payload(marker))
    for ckpt in (out / "checkpoints").iterdir():
        for f in ckpt.iterdir():  # every file that is not safetensors or JSON gets the payload
            if f.suffix not in (".safetensors", ".json"):
                f.write_bytes(payload)
        for name in (".metadata", "trainer-0.pt", "__0_0.distcp"):  # what older formats read by unpickling
            (ckpt / name).write_bytes(payload)
    p = run_train(train_cmd(tiny_run, out, "--max-steps", "6", "--resume"), ok=False)
    assert not marker.exists(), "resuming ran code from the checkpoint folder"
    assert p.returncode == 0 or "Traceback" not in p.stdout + p.stderr


# -----------------------------------------------------------------------------
# Never a perfect score from nothing


def test_a_val_split_shorter_than_a_window_is_scored_not_zero():
    """bpb of a 40-token split at seq_len 512: one window of all 40 tokens, equal to the formula."""
    from train import val_loss_and_bpb
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=50, n_layers=1)).eval()
    model.init_weights()
    tokens = np.random.default_rng(0).integers(0, 50, 40)
    token_bytes = np.arange(50) % 3  # some tokens have no bytes (special tokens)
    result = val_loss_and_bpb(model, {"d": tokens}, 512, 4, token_bytes, torch.device("cpu"), 10)
    x, y = torch.tensor(tokens[:-1])[None], torch.tensor(tokens[1:])
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(model(x)[0], y, reduction="none").double().numpy()
    b = token_bytes[tokens[1:]]
    assert result["val/d"] == pytest.approx(nats.mean(), rel=1e-5)
    assert result["bpb/d"] == pytest.approx(nats[b > 0].sum() / np.log(2) / b.sum(), rel=1e-5)
    with pytest.raises(ValueError, match="the d val split has 1 token"):
        val_loss_and_bpb(model, {"d": tokens[:1]}, 512, 4, token_bytes, torch.device("cpu"), 10)


def sft_data(root, n_long, n_short, seq_words=400):
    """A chat checkpoint-to-be's SFT stage: n_long conversations whose user turn alone is longer than the sequence
    (nothing trainable survives the cut) and n_short ordinary ones."""
    folder = root / "data" / "telco" / "sft"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": "tell me " * seq_words},
                          {"role": "assistant", "content": "No."}]} for _ in range(n_long)]
    rows += [{"messages": [{"role": "user", "content": f"What is QoS {i}?"},
                           {"role": "assistant", "content": "Quality of service."}]} for i in range(n_short)]
    (folder / "1_stage.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_drops_conversations_cut_to_nothing_and_runs_a_stage_smaller_than_a_batch(tiny_run, tmp_path):
    sft_data(tmp_path, n_long=12, n_short=3)
    cmd = [sys.executable, "sft.py", "--init-from", str(tiny_run / "init"), "--domain", "telco", "--data-root",
           str(tmp_path / "data"), "--out", str(tmp_path / "sft"), "--seq-len", "64", "--batch-size", "16",
           "--micro-batch-size", "8", "--epochs", "2", "--save-every", "0"]
    p = run(cmd)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "12 dropped" in p.stdout + p.stderr
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows if "loss" in r)


# -----------------------------------------------------------------------------
# Flags that make no sense are refused before any work


@pytest.mark.parametrize("script, flags, flag", [
    ("train.py", ["--min-lr", "-1e-4"], "--min-lr"),
    ("train.py", ["--min-lr", "1"], "--min-lr"),
    ("train.py", ["--max-steps", "0"], "--max-steps"),
    ("train.py", ["--batch-size", "0"], "--batch-size"),
    ("train.py", ["--micro-batch-size", "0"], "--micro-batch-size"),
    ("train.py", ["--seq-len", "0"], "--seq-len"),
    ("train.py", ["--replay-ratio", "1.5"], "--replay-ratio"),
    ("train.py", ["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    ("sft.py", ["--epochs", "0"], "--epochs"),
    ("distill.py", ["--teacher", "x", "--temperature", "0"], "--temperature"),
    ("speculative.py", ["--target", "x", "--top-p", "1.5"], "--top-p"),
    ("speculative.py", ["--target", "x", "--top-p", "0"], "--top-p"),
    ("speculative.py", ["--target", "x", "--temperature", "-1"], "--temperature"),
    ("speculative.py", ["--target", "x", "--top-k", "0"], "--top-k"),
    ("eval.py", ["x", "--domain", "telco", "--limit", "0"], "--limit"),
    ("memory.py", ["plan", "135m", "--world", "0"], "--world"),
    ("memory.py", ["plan", "135m", "--micro-batch-size", "-1"], "--micro-batch-size"),
    ("memory.py", ["plan", "135m", "--seq-len", "0"], "--seq-len"),
    ("speculative.py", ["--target", "x", "--prompt", ""], "--prompt"),
    ("distill.py", ["--teacher", "x", "--seq-len", "64", "--gen-tokens", "64"], "--gen-tokens"),
])
def test_nonsense_flags_are_refused_naming_the_flag(tiny_run, tmp_path, script, flags, flag):
    out = ["--out", str(tmp_path / "out")] if script not in ("speculative.py", "memory.py") else []
    p = run([sys.executable, script, *out, *flags], cwd=REPO)
    assert_user_error(p, re.escape(flag))
    assert not (tmp_path / "out").exists()


def test_an_mcq_answer_of_true_is_refused(tmp_path):
    from eval import check_mcq
    assert "answer" in check_mcq({"question": "q", "choices": ["a", "b"], "answer": True})
    assert check_mcq({"question": "q", "choices": ["a", "b"], "answer": 1}) is None


# -----------------------------------------------------------------------------
# Errors in the user's words, no leftovers, shareable exports


def damaged_copy(tiny_run, tmp_path, name, damage):
    init = tmp_path / name
    shutil.copytree(tiny_run / "init", init)
    damage(init)
    return init


def test_user_errors_name_their_file_without_a_traceback(tiny_run, tmp_path):
    # a corpus file that is not UTF-8; and nothing half-written stays in the token cache
    data = tmp_path / "data"
    shutil.copytree(tiny_run / "data", data)
    (data / "telco" / "train" / "zz-latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    cmd = train_cmd(tiny_run, tmp_path / "o1")
    cmd[cmd.index("--data-root") + 1] = str(data)
    assert_user_error(run_train(cmd, ok=False), r"zz-latin1\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)")
    assert not [f for f in os.listdir(data / "telco" / ".tokens") if f.endswith(".tmp")]
    # a truncated safetensors file, a config.json that is not JSON, one without hidden_size
    cases = [("trunc", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
              r"model\.safetensors: not a readable safetensors file"),
             ("badjson", lambda d: (d / "config.json").write_text("{oops"), r"config\.json: not valid JSON"),
             ("nohidden", lambda d: (d / "config.json").write_text(json.dumps(
                 {k: v for k, v in json.load(open(d / "config.json")).items() if k != "hidden_size"})),
              r"config\.json: no 'hidden_size'")]
    sft_data(tmp_path / "sft-root", n_long=0, n_short=4)
    for name, damage, message in cases:
        init = damaged_copy(tiny_run, tmp_path, name, damage)
        for script, root in (("train.py", tiny_run), ("sft.py", tmp_path / "sft-root")):
            cmd = [sys.executable, script, "--init-from", str(init), "--domain", "telco", "--data-root",
                   str(root / "data"), "--out", str(tmp_path / f"out-{name}-{script}")]
            assert_user_error(run(cmd), message)
    # a training corpus shorter than one window
    tiny = tmp_path / "tiny-data"
    shutil.copytree(tiny_run / "data", tiny)
    for f in (tiny / "telco" / "train").iterdir():
        f.unlink()
    (tiny / "telco" / "train" / "a.txt").write_text("Too short.")
    cmd = train_cmd(tiny_run, tmp_path / "o2")
    cmd[cmd.index("--data-root") + 1] = str(tiny)
    assert_user_error(run_train(cmd, ok=False), r"telco/train/: \d+ tokens, shorter than one training window")
    # a QA row whose messages has no user turn
    (tmp_path / "qa" / "eval").mkdir(parents=True)
    shutil.copytree(tiny_run / "data" / "telco" / "val", tmp_path / "qa" / "val")
    (tmp_path / "qa" / "train").mkdir()
    (tmp_path / "qa" / "eval" / "qa.jsonl").write_text(json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}], "reference": "x"}) + "\n")
    p = run([sys.executable, "eval.py", str(tiny_run / "init"), "--domain", "qa", "--general", "qa",
             "--data-root", str(tmp_path), "--out", str(tmp_path / "report")])
    assert_user_error(p, r"qa\.jsonl:1: .*no user turn")


def test_exports_have_the_users_file_mode(tiny_run, tmp_path):
    out = tmp_path / "out"
    run_train(train_cmd(tiny_run, out, "--max-steps", "1"))
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: oct((out / f).stat().st_mode & 0o777) for f in ("model.safetensors", "config.json",
                                                               "tokenizer.json", "tokenizer_config.json")}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_a_gguf_file_or_a_folder_without_tokenizer_files_is_named(tiny_run, tmp_path):
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    p = run_train(train_cmd(tiny_run, tmp_path / "o1", "--init-from", str(tmp_path / "model.Q4_1.gguf")), ok=False)
    assert_user_error(p, r"model\.Q4_1\.gguf: a GGUF file, not an HF directory; de-quantise it")
    bare = tmp_path / "weights-only"
    shutil.copytree(tiny_run / "init", bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    p = run_train(train_cmd(tiny_run, tmp_path / "o2", "--init-from", str(bare)), ok=False)
    assert_user_error(p, r"weights-only/tokenizer\.json: not found")


# -----------------------------------------------------------------------------
# A stage's output is complete or visibly not; what a failed or killed run leaves does not block the next


def test_a_failed_start_does_not_block_its_correction(tiny_run, tmp_path):
    """A mistyped --init-from fails before any work; the corrected command then runs as a new run (no run.json
    was left to refuse it with and without --resume)."""
    out = tmp_path / "out"
    assert_user_error(run_train(train_cmd(tiny_run, out, "--init-from", str(tmp_path / "missing")), ok=False),
                      "not a directory nor a preset")
    run_train(train_cmd(tiny_run, out, "--max-steps", "1"))


def test_a_finished_run_marks_itself_complete_after_its_export(tiny_run, tmp_path):
    """The export writes config.json after the tokenizer files and generation_config.json, and the run writes
    complete.json after all of them: a folder killed anywhere before is visibly unfinished (workshop.sh checks
    complete.json)."""
    out = tmp_path / "out"
    run_train(train_cmd(tiny_run, out, "--max-steps", "1"))
    mtime = {f: (out / f).stat().st_mtime_ns for f in ("tokenizer.json", "tokenizer_config.json",
                                                       "generation_config.json", "model.safetensors", "config.json",
                                                       "complete.json")}
    assert max(mtime.values()) == mtime["complete.json"]
    assert mtime["config.json"] >= max(v for k, v in mtime.items() if k != "complete.json")


def test_the_export_writes_the_tokenizer_the_run_loaded(tiny_run, tmp_path):
    """The tokenizer files are those read at the start, even if the folder they came from changed since."""
    init = tmp_path / "init"
    shutil.copytree(tiny_run / "init", init)
    tok = Tokenizer.from_pretrained(init)
    loaded = (init / "tokenizer.json").read_bytes()
    (init / "tokenizer.json").write_text("{}")  # changed (or removed) while the run trained
    tok.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == loaded


def test_a_tokenizer_from_another_model_is_refused(tiny_run, tmp_path):
    """A tokenizer.json copied from elsewhere beside the weights trained and exported without a word."""
    init = tmp_path / "init"
    shutil.copytree(tiny_run / "init", init)
    config = json.loads((init / "config.json").read_text())  # the checkpoint says its eos, as real ones do
    (init / "config.json").write_text(json.dumps({**config, "eos_token_id": Tokenizer.from_pretrained(init).eos_id}))
    Tokenizer.train(["another model's text, another model's merges " * 40], 300).save_pretrained(init)
    assert_user_error(run_train(train_cmd(tiny_run, tmp_path / "out", "--init-from", str(init)), ok=False),
                      "the tokenizer belongs to another model")


def test_a_tied_config_whose_checkpoint_stores_its_own_head_is_refused(tmp_path):
    """transformers keeps such a head (and warns); dropping it silently changes every logit."""
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300, tie_embeddings=False))
    model.init_weights()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="lm_head.weight is not its embedding"):
        Transformer.from_pretrained(tmp_path)


def test_peak_memory_of_a_run_resumed_on_another_number_of_processes(tmp_path):
    """metrics.jsonl rows of 2 processes, then of 1 after a resume: the peaks of the processes of the last part."""
    import memory
    rows = [{"step": 1, "peak_mb": [10, 12]}, {"step": 2, "peak_mb": [11, 9]}, {"step": 3, "peak_mb": [30]},
            {"step": 4, "peak_mb": [25]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert memory.step_peaks(tmp_path) == [30]


def test_a_killed_writers_temporary_files_are_swept_by_the_next_run(tiny_run, tmp_path):
    """A SIGKILL mid-export leaves .model.safetensors.<host>-<pid>.*.tmp; the next run on that --out removes it
    (and leaves a live process's alone)."""
    from files import temporary_name
    out = tmp_path / "out"
    out.mkdir()
    mine = temporary_name(out / "model.safetensors")  # a live writer: this process
    dead = subprocess.run([sys.executable, "-c", f"from files import temporary_name; "
                           f"print(temporary_name({str(out / 'model.safetensors')!r}))"],
                          cwd=REPO, env=ENV, capture_output=True, text=True).stdout.strip()
    assert os.path.exists(dead)
    run_train(train_cmd(tiny_run, out, "--max-steps", "1"))
    assert not os.path.exists(dead) and os.path.exists(mine)


def test_a_failed_weight_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    """A full disk mid-export: the half-written files are removed, not left holding the space."""
    import hf

    def full(path, specs, keys, tensors):
        open(path, "wb").write(b"x" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hf, "write_safetensors", full)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300))
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_out_is_a_one_line_error(tiny_run, tmp_path):
    (tmp_path / "a-file").write_text("")
    assert_user_error(run_train(train_cmd(tiny_run, tmp_path / "a-file" / "out"), ok=False), "a-file")


def test_decoding_past_the_context_is_a_one_line_error(tiny_run):
    p = run([sys.executable, "speculative.py", "--target", str(tiny_run / "init"), "--prompt", "hello",
             "--max-new-tokens", "100000"])
    assert_user_error(p, "max_seq_len")


# -----------------------------------------------------------------------------
# workshop.sh: its knobs checked first, its children stopped with it


@pytest.mark.parametrize("knobs, message", [
    (dict(ABLATION="replya"), "ABLATION=replya: expected replay or sft"),
    (dict(TARGET="models/no-such-model"), "TARGET=models/no-such-model: neither an HF directory"),
    (dict(DACP_STEPS="ten"), "DACP_STEPS=ten: expected a whole number"),
    (dict(SFT_EPOCHS="0.0"), "SFT_EPOCHS=0.0: expected a number > 0"),
    (dict(RATIOS="0.5,1.5"), "RATIOS=0.5,1.5: expected replay ratios in"),
    (dict(DTYPE="fp16"), "DTYPE=fp16: expected float32 or bfloat16"),
    (dict(CHAT_TEMPLATE="no/such.jinja"), "CHAT_TEMPLATE=no/such.jinja: no such file"),
])
def test_workshop_refuses_a_bad_knob_before_any_stage(tmp_path, knobs, message):
    p = subprocess.run(["bash", "workshop.sh"], cwd=REPO, env={**ENV, "OUT": str(tmp_path / "out"), **knobs},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and message in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing was run


def test_workshop_refuses_a_base_checkpoint_without_a_chat_template_before_any_stage(tmp_path):
    """SFT needs a chat template: a base checkpoint without one is refused before DACP has run, naming the knob."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    env = {**ENV, "OUT": str(tmp_path / "out"), "TARGET": str(base)}
    p = subprocess.run(["bash", "workshop.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"TARGET={base} has no chat template (a base model): set CHAT_TEMPLATE" in p.stderr
    assert not (tmp_path / "out").exists()


def test_killing_workshop_sh_stops_its_torchrun_children(tmp_path):
    """SIGKILL cannot be trapped; the stages run with the parent-death signal, so torchrun and its workers stop
    with the script instead of running on (and holding the output's lock)."""
    import signal
    import time
    out = tmp_path / "out"
    p = subprocess.Popen(["bash", "workshop.sh"], cwd=REPO, env={**ENV, "OUT": str(out), "BASE_STEPS": "500"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children():  # every process whose command line names this --out
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if str(out) in cmdline and int(pid) != p.pid:
                found.append(pid)
        return found
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "base" / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert children(), "the first stage did not start"
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 30
    while time.time() < deadline and children():
        time.sleep(0.5)
    assert children() == []


def test_the_export_keeps_every_stop_token_of_the_source(tmp_path):
    """generation_config.json keeps the source checkpoint's eos ids and adds the model's: Qwen2.5-Instruct stops at
    <|im_end|> (151645, config.json's eos) and <|endoftext|> (151643, only in its generation_config), Gemma-3-it at
    <eos> and <end_of_turn>; an export that listed only config.json's would run past the second."""
    import transformers
    from checkpoint import write_generation_config
    source = tmp_path / "source"
    source.mkdir()
    (source / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "do_sample": True,
                                                               "eos_token_id": [151645, 151643]}))
    config = ModelConfig(vocab_size=151936, bos_token_id=151643, eos_token_id=[151645, 7])  # 7: a new end of turn
    write_generation_config(str(tmp_path), config, str(source))
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert generation.eos_token_id == [151645, 151643, 7] and generation.do_sample
