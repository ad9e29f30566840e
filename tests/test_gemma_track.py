"""The base-model track (`TARGET=models/gemma3-270m bash workshop.sh`) end to end with every knob turned down, on the
small copy of the sample data that tests/test_real_track.py builds: workshop.sh's own Gemma-3 choices (the sample
chat template for a base model without one, a fraction of each SFT stage's conversations, the draft's reduced head)
through DACP, curriculum SFT, distillation, speculative decoding, evaluation and the paper table. Needs the real
checkpoint (python prepare_real_model.py); about 4 minutes on 2 CPU cores, so it is marked `track` and run apart:
`python -m pytest -q -m track`."""
import json
import os

import pytest
import torch
import transformers

from conftest import REPO
from test_real_track import small_data, workshop

from chat import render_chat
from draft_vocab import DRAFT_VOCAB
from model import Transformer
from tokenizer import Tokenizer

GEMMA = os.path.join(REPO, "models", "gemma3-270m")
TEMPLATE = os.path.join(REPO, "data", "chat_templates", "gemma.jinja")
pytestmark = [pytest.mark.track,
              pytest.mark.skipif(not os.path.isfile(os.path.join(GEMMA, "config.json")),
                                 reason=f"no Gemma-3 checkpoint at {GEMMA} (run python prepare_real_model.py)")]


@pytest.fixture(scope="module")
def track(tmp_path_factory):
    data, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("gemma")
    small_data(data)
    # SFT_EPOCHS as the Gemma track's default: half of each stage's 4 conversations; CHAT_TEMPLATE left to the script
    stdout = workshop(out, data, TARGET=GEMMA, SFT_EPOCHS="0.5")
    return out, stdout


def test_the_sft_model_renders_chats_as_transformers_with_the_sample_template(track):
    """The base model had no chat template: the exported SFT model carries gemma.jinja, and transformers'
    apply_chat_template on it gives the ids our tokenizer renders (the ids it was trained on)."""
    out, _ = track
    path = os.path.join(out, "telco-sft")
    config = json.load(open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8"))
    assert config["chat_template"] == open(TEMPLATE, encoding="utf-8").read()
    chat = [{"role": "user", "content": "What does a SIM card store?"},
            {"role": "assistant", "content": "Your subscriber identity and the keys that prove it."}]
    ids, _ = render_chat(Tokenizer.from_pretrained(path), chat)
    assert ids == list(transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(chat)["input_ids"])


def test_the_sft_model_loads_in_transformers_with_our_logits(track):
    out, _ = track
    path = os.path.join(out, "telco-sft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([Tokenizer.from_pretrained(path).encode("The eNodeB hands the call over when")])
    with torch.no_grad():
        theirs = hf(x).logits
        assert ((ours(x) - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def test_the_draft_keeps_a_reduced_head_over_the_frequent_tokens(track):
    """workshop.sh's DRAFT_VOCAB (4,096 + stop tokens) of Gemma-3's 262,144: the id map beside the exported draft."""
    out, _ = track
    kept = json.load(open(os.path.join(out, "telco-draft", DRAFT_VOCAB)))
    assert kept["draft_vocab"] == 4096 and 4096 <= len(kept["ids"]) <= 4100
    assert len(set(kept["ids"])) == len(kept["ids"]) and max(kept["ids"]) < 262_144


def test_every_stage_ran_and_the_paper_table_names_the_gemma_track(track):
    out, stdout = track
    assert stdout.count("\n+ ") == 6  # DACP, SFT, distillation, speculative, eval, report: each printed
    assert "--chat-template data/chat_templates/gemma.jinja" in stdout and "--epochs 0.5" in stdout
    metrics = json.load(open(os.path.join(out, "eval-telco.json")))["metrics"]
    assert list(metrics) == [GEMMA, os.path.join(out, "telco"), os.path.join(out, "telco-sft")]
    table = open(os.path.join(out, "paper-vs-ours.md")).read()
    assert f"TARGET={GEMMA} OUT={out} ABLATION=replay bash workshop.sh" in table
    assert "time per stage" in table
