"""distill.py's acceptance measurement: Leviathan et al.'s alpha, the mean over the teacher's own continuations of
sum_x min(p(x), q(x)) (greedy: the draft's argmax is the teacher's token), written out here from plain forward
passes; the teacher's continuations come from batched passes, as many for 1 prompt as for 4; a reduced draft head
has q = 0 outside its ids."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import distill
from draft_vocab import prune_head
from model import IGNORE, ModelConfig, Transformer

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]


def tiny_model(seed, vocab_size=64):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=64, max_seq_len=64))
    model.init_weights()
    return model.eval()


def flags(**kw):
    return argparse.Namespace(**{**dict(seed=0, gen_tokens=6, gen_batch_size=16, seq_len=32, gen_temperature=1.0,
                                        gamma=2, replicate_teacher=False), **kw})


def reference_alpha(teacher, draft, rows, greedy, kept=None):
    """Row by row, position by position, from each model's whole logits."""
    betas = []
    for ids, labels in rows:
        x = torch.tensor([ids])
        with torch.no_grad():
            p, q_logits = F.softmax(teacher(x)[0], -1), draft(x)[0]
        if kept is not None:
            q_logits = torch.full_like(q_logits, -float("inf")).index_copy(-1, torch.tensor(kept),
                                                                           q_logits[:, kept])
        q = F.softmax(q_logits, -1)
        for t, label in enumerate(labels):
            if label != IGNORE:
                betas.append(float(q_logits[t].argmax() == label) if greedy else
                             float(torch.minimum(p[t], q[t]).sum()))
    return sum(betas) / len(betas)


@pytest.fixture(scope="module")
def pair():
    teacher, draft = tiny_model(0), tiny_model(1)
    return teacher, draft, distill.held_out_paths(teacher, PROMPTS, flags(), None, torch.float32)


def test_the_greedy_paths_are_the_teachers_greedy_tokens(pair):
    teacher, _, paths = pair
    for ids, labels in paths[0.0]:
        with torch.no_grad():
            argmax = teacher(torch.tensor([ids]))[0].argmax(-1).tolist()
        assert [a for a, y in zip(argmax, labels) if y != IGNORE] == [y for y in labels if y != IGNORE]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_alpha_is_the_mean_acceptance_probability_along_the_paths(pair, temperature):
    teacher, draft, paths = pair
    ours = distill.expected_acceptance(teacher, draft, paths[temperature], 0, greedy=temperature == 0)
    assert ours == pytest.approx(reference_alpha(teacher, draft, paths[temperature], temperature == 0), abs=1e-5)
    assert 0 < distill.expected_acceptance(teacher, draft, paths[1.0], 0, greedy=False) < 1


def test_a_draft_as_the_teacher_is_always_accepted(pair):
    teacher, _, paths = pair
    result = distill.acceptance(teacher, teacher, paths, flags(), 0)
    assert result["acceptance_greedy"] == 1.0 and result["acceptance_T=1"] == pytest.approx(1.0, abs=1e-5)


def test_a_reduced_draft_head_proposes_nothing_outside_its_ids(pair):
    teacher, draft, paths = pair
    kept = list(range(0, 64, 2))
    pruned = prune_head(Transformer(draft.config).eval(), kept)
    pruned.load_state_dict({**draft.state_dict(), "lm_head.weight": draft.lm_head.weight[kept]})
    for temperature in (0.0, 1.0):
        ours = distill.expected_acceptance(teacher, pruned, paths[temperature], 0, greedy=temperature == 0)
        assert ours == pytest.approx(reference_alpha(teacher, draft, paths[temperature], temperature == 0, kept),
                                     abs=1e-5)


def test_the_teacher_runs_as_many_passes_for_four_prompts_as_for_one():
    """Through a teacher sharded over processes every pass gathers every block: the measurement costs passes per
    generated token, not per prompt (decoding each prompt speculatively cost a pass per round per prompt)."""
    def passes(prompts):
        teacher, draft = tiny_model(0), tiny_model(1)
        calls = []
        teacher.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        paths = distill.held_out_paths(teacher, prompts, flags(), None, torch.float32)
        distill.acceptance(teacher, draft, paths, flags(replicate_teacher=True), 0)
        return len(calls)
    assert passes(PROMPTS) == passes(PROMPTS[:1])
