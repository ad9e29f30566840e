"""A draft with a reduced output vocabulary (FR-Spec; draft_vocab.py, speculative.load_draft, distill.py --draft-vocab):
its head scores only the kept ids, greedy speculative decoding still equals the target's greedy decoding, sampled
tokens still follow the target's distribution exactly (a chi-square test), and the exported draft is an HF model
that transformers loads whole, with the kept ids beside it."""
import json
import os

import pytest
import torch

from test_speculative import PROMPT, chi_square_pvalue, exact_joint, noisy_copy, tiny

from draft_vocab import DRAFT_VOCAB, frequent_vocab, prune_head
from speculative import generate, load_draft, logits_to_probs, speculative_generate


def test_the_pruned_head_is_the_whole_heads_rows():
    """prune_head: the pruned head is a copy of the whole head's rows at the kept ids, so its logits are the whole
    head's at those ids (up to float32 rounding: a matmul over 5 rows may sum in another order than over 64)."""
    model = tiny(0, vocab_size=64)
    x = torch.tensor([PROMPT])
    ids = [3, 8, 17, 42, 63]
    with torch.no_grad():
        whole, rows = model(x), model.lm_head.weight[ids].clone()
        pruned = prune_head(model, ids)(x)  # (in place)
    assert torch.equal(model.lm_head.weight, rows)
    torch.testing.assert_close(pruned, whole[..., ids], rtol=1e-6, atol=1e-6)


def test_frequent_vocab_keeps_the_most_frequent_and_the_stop_tokens():
    counts = [5, 0, 9, 9, 1, 7]
    assert frequent_vocab(counts, 3) == [2, 3, 5]  # 9, 9 (the lower id first), 7
    assert frequent_vocab(counts, 2, keep=[1, None]) == [1, 2, 3]  # the stop token 1 although never counted
    with pytest.raises(ValueError, match="not between 1 and 6"):
        frequent_vocab(counts, 7)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_with_a_pruned_draft_equals_greedy_target(gamma):
    """Whatever ids the draft may propose, the output is the target's own greedy tokens; the kept half of the
    vocabulary holds most of what the target says, so drafts are accepted and rejected."""
    target = tiny(0)
    expected = generate(target, PROMPT, 50)
    keep = sorted(set(expected) | set(range(0, 64, 2)))
    draft = prune_head(noisy_copy(target, 0.05, 1), keep)
    out, stats = speculative_generate(target, draft, PROMPT, 50, gamma=gamma)
    assert out == expected
    assert 0 < stats["acceptance_rate"] < 1


def test_sampled_tokens_with_a_pruned_draft_follow_the_target_distribution():
    """q is zero outside the kept ids, so every token outside them comes from the residual draw: the joint of two
    sampled tokens is still the target's (chi-square), and not the pruned draft's (the test has power)."""
    V, n = 6, 1500
    target, draft = tiny(0, vocab_size=V, std=1.0), tiny(1, vocab_size=V, std=1.0)
    kept = [0, 2, 3]
    prune_head(draft, kept)
    torch.manual_seed(4321)
    counts = torch.zeros(V * V, dtype=torch.float64)
    accepted = rejected = 0
    for _ in range(n):
        out, stats = speculative_generate(target, draft, [2], 2, gamma=2, temperature=1.0)
        counts[out[0] * V + out[1]] += 1
        accepted, rejected = accepted + stats["accepted"], rejected + stats["rejected"]
    assert accepted > 100 and rejected > 100
    assert chi_square_pvalue(counts, n * exact_joint(target, [2], V, temperature=1.0)) > 1e-3

    @torch.no_grad()
    def pruned_joint():  # the draft's own distribution over the kept ids, zero elsewhere
        def probs(prompt):
            p = torch.zeros(V)
            p[kept] = logits_to_probs(draft(torch.tensor([prompt]))[0, -1], temperature=1.0)
            return p
        p1 = probs([2])
        return torch.stack([p1[a] * probs([2, a]) for a in range(V)]).flatten().double()
    assert chi_square_pvalue(counts, n * pruned_joint() + 1e-9) < 1e-6


def test_an_exported_pruned_draft_loads_whole_in_transformers_and_pruned_in_load_draft(tmp_path):
    """The directory is an ordinary HF model (transformers: the whole head, our logits); draft_vocab.json beside it
    makes load_draft give the reduced head."""
    transformers = pytest.importorskip("transformers")
    from conftest import randomize
    from tokenizer import Tokenizer
    model = tiny(0, vocab_size=300)
    randomize(model)
    model.save_pretrained(tmp_path)
    Tokenizer.train(["the cell hands the call over"] * 20, 300).save_pretrained(tmp_path)
    (tmp_path / DRAFT_VOCAB).write_text(json.dumps({"ids": [1, 5, 9, 30]}))
    x = torch.tensor([PROMPT])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        whole = hf(x).logits
    torch.testing.assert_close(model(x).detach(), whole, rtol=1e-5, atol=1e-5)
    draft, _ = load_draft(tmp_path, torch.device("cpu"))
    assert draft.vocab_ids.tolist() == [1, 5, 9, 30]
    with torch.no_grad():
        torch.testing.assert_close(draft(x), whole[..., [1, 5, 9, 30]], rtol=1e-5, atol=1e-5)
    (tmp_path / DRAFT_VOCAB).write_text(json.dumps({"ids": [1, 300]}))
    with pytest.raises(ValueError, match="draft_vocab.json: ids must be token ids"):
        load_draft(tmp_path, torch.device("cpu"))


KEPT = [0, 3, 7, 11, 20, 49]  # a reduced draft vocabulary of the tiny pair below


def tiny_pair():
    """A random student and teacher of 50 tokens, and a [2, 2, 12] (ids, labels) batch labelled from position 4."""
    from model import IGNORE, ModelConfig, Transformer
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=50, max_seq_len=32)
    student, teacher = Transformer(config), Transformer(config)
    for m in (student, teacher):
        m.init_weights(0.5)
    ids = torch.randint(0, 50, (2, 12))
    labels = torch.full((2, 12), IGNORE)
    labels[:, 4:] = ids[:, 4:]
    return student, teacher, torch.stack([ids, labels], 1)


def test_distillation_on_the_kept_ids_is_the_kl_of_the_renormalised_distributions():
    """distill.distilled with kept ids: sum over positions of KL(p || q), p and q the teacher's and the student's
    softmax over the kept ids alone (T = 1), written out here."""
    from distill import distilled
    student, teacher, batch = tiny_pair()
    ids = batch[:, 0]
    loss = distilled(student, teacher, batch, "fkl", kept=KEPT)
    with torch.no_grad():
        p = torch.softmax(teacher(ids)[:, 4:, KEPT].double(), -1)
        q = torch.softmax(student(ids)[:, 4:, KEPT].double(), -1)
    assert loss.item() == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-5)


def test_distillation_on_the_kept_ids_trains_as_the_written_out_kl_does():
    """The reduced path (both heads computing only the kept rows' logits) gives the student the gradients of the
    formula above, taken by autograd through the whole vocabulary's logits."""
    from distill import distilled
    student, teacher, batch = tiny_pair()
    ids = batch[:, 0]
    distilled(student, teacher, batch, "fkl", kept=KEPT).backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    with torch.no_grad():
        p = torch.softmax(teacher(ids)[:, 4:, KEPT], -1)
    log_q = torch.log_softmax(student(ids)[:, 4:, KEPT], -1)
    (p * (p.log() - log_q)).sum().backward()
    for name, param in student.named_parameters():  # (equal up to fp32 rounding, relative to the largest)
        assert (ours[name] - param.grad).abs().max() <= 1e-5 * param.grad.abs().max(), name
