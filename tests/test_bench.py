"""bench.py end to end on tiny random models: every section runs, both training losses agree, greedy outputs and
token ids are identical to the references, and the JSON holds the numbers."""
import json

import pytest
import torch

import bench
import model as model_py
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

TEXT = ("The gNodeB hands the UE over to a neighbour cell when its RSRP drops below the threshold. "
        "VoLTE carries voice over the IMS core; the P-CSCF is the first contact point. Data caps and fair use. ")


def test_bench_all_sections(tmp_path):
    (tmp_path / "data" / "telco" / "train").mkdir(parents=True)
    (tmp_path / "data" / "telco" / "train" / "a.txt").write_text(TEXT * 20, encoding="utf-8")
    tok = Tokenizer.train([TEXT], 300)
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=layers, n_heads=4, n_kv_heads=2,
                                        hidden_dim=64, max_seq_len=256))
        model.init_weights(0.5)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--json", str(out), "--preset", "tiny", "--vocab-size", "300", "--batch-size",
                "2", "--seq-len", "16", "--steps", "1", "--warmup", "1", "--target", str(tmp_path / "target"),
                "--draft", str(tmp_path / "draft"), "--prompt", "What is VoLTE?", "--prompt",
                "Why does a handover fail when the neighbour cell is congested?", "--max-new-tokens", "8",
                "--gamma", "2", "--data-root", str(tmp_path / "data"), "--tokenize-mb", "0.01", "--repeats", "1"])
    result = json.loads(out.read_text())
    assert result["train"]["loss_match"]
    assert abs(result["train"]["runs"]["eager"]["last_loss_ours"]
               - result["train"]["runs"]["eager"]["last_loss_theirs"]) < 1e-3
    for kind in ("plain", "speculative"):
        run = result["decode"]["eager"][kind]
        assert run["identical"] == run["prompts"] == 2
        assert run["tokens_ours"] == run["tokens_theirs"] == 16
    batched = result["decode"]["eager"]["batched"]  # 8 left-padded rows of 2 prompts: transformers' batched tokens
    assert batched["identical"] == batched["prompts"] == 8 and batched["tokens_ours"] == batched["tokens_theirs"] == 64
    roofline = result["decode"]["limit_tokens_per_s"]  # the measured copy bandwidth over the untied target's bytes
    target = Transformer.from_pretrained(tmp_path / "target")
    assert result["decode"]["weight_bytes"] == 4 * (sum(p.numel() for p in target.parameters())
                                                    - target.model.embed_tokens.weight.numel())
    assert result["decode"]["eager"]["plain"]["bandwidth_fraction_ours"] == pytest.approx(
        result["decode"]["eager"]["plain"]["tokens_per_s_ours"] / roofline)
    assert result["tokenize"]["1 string"]["ids_equal"]
    assert len(result["rows"]) == 1 + 3 + 4 and all(r["ratio"] > 0 for r in result["rows"])


def test_bench_draft_vocab_measures_each_depth_of_a_truncated_draft(tmp_path):
    """--draft-layers 1,2: a row per depth and K. The target's every layer with the whole head IS the target, so
    its greedy acceptance is exactly 1; the kept tokens' share of the corpus is 1 with the whole vocabulary."""
    for split in ("train", "val"):
        (tmp_path / "data" / "telco" / split).mkdir(parents=True)
        (tmp_path / "data" / "telco" / split / "a.txt").write_text(TEXT * 20, encoding="utf-8")
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=64, max_seq_len=256))
    model.init_weights(0.5)
    model.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--only", "draft-vocab", "--json", str(out), "--target", str(tmp_path / "target"),
                "--draft-layers", "1,2", "--draft-vocab-sizes", "16,0", "--prompt", "What is VoLTE?",
                "--max-new-tokens", "8", "--gamma", "2", "--data-root", str(tmp_path / "data")])
    rows = json.loads(out.read_text())["draft-vocab"]
    assert sorted(rows) == ["K 16, 1 layers", "K 16, 2 layers", "K all, 1 layers", "K all, 2 layers"]
    assert rows["K all, 2 layers"]["acceptance"] == 1.0 and rows["K all, 2 layers"]["coverage"] == 1.0
    assert rows["K 16, 2 layers"]["coverage"] < 1.0


def test_bench_verify_times_each_kernel_and_the_packed_weights(tmp_path):
    """--only verify: the target's pass over 2..5 tokens in one-token steps, a row per kernel; on an x86 CPU the
    weights packed in oneDNN's layout (model.pack, what decoding uses) get their own rows."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                    max_seq_len=256))
    model.init_weights(0.5)
    model.save_pretrained(tmp_path / "target")
    Tokenizer.train([TEXT], 300).save_pretrained(tmp_path / "target")
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--only", "verify", "--target", str(tmp_path / "target"), "--json", str(out)])
    rows = json.loads(out.read_text())["verify"]
    expected = {"float32, F.linear (MKL)", "bfloat16"}
    if model_py.ONEDNN:
        expected |= {"float32, oneDNN (model.Linear)", "float32, oneDNN, packed (model.pack)",
                     "bfloat16, oneDNN, packed (model.pack)"}
    assert set(rows) == expected
    assert all(r["step_ms"] > 0 and all(r[str(n)] > 0 for n in range(2, 6)) for r in rows.values())


def test_a_malformed_draft_layers_list_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        bench.get_args(["--draft-layers", "2,four"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--draft-layers" in err and "Traceback" not in err
