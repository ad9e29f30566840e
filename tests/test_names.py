"""The names other files and users rely on (the README's map) resolve where they are documented."""
import importlib

import pytest

NAMES = {
    "model": ["ModelConfig", "Transformer", "PRESETS", "to_dtype"],
    "tokenizer": ["Tokenizer"],
    "data": ["Tokenizer", "render_chat", "tokenize_corpus", "ReplayMixture", "Curriculum", "sft_files"],
    "train": ["train_loop", "Schedule", "Step", "cosine_lr", "val_loss_and_bpb", "bits_per_byte", "retention",
              "rank_share", "gather"],
    "speculative": ["generate", "speculative_generate", "predicted_speedup", "cut_at_eos"],
    "distill": ["distillation_loss", "seeded"],
    "eval": ["bleu4", "rouge1", "multiple_choice"],
    "files": ["write_atomic", "commit", "fsync", "temporary_name"],
}


@pytest.mark.parametrize("module", NAMES)
def test_documented_names_resolve(module):
    m = importlib.import_module(module)
    missing = [n for n in NAMES[module] if not hasattr(m, n)]
    assert not missing, f"{module} lacks {missing}"


def test_data_reexports_the_tokenizer():
    import data
    import tokenizer
    assert data.Tokenizer is tokenizer.Tokenizer
