"""speculative.py: greedy speculative decoding equals greedy decoding of the target; sampled speculative decoding
follows the target's (processed) distribution exactly (a chi-square test against exact probabilities, which
rejects the draft's distribution); the sampling filters equal transformers' logits processors."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import speculative
from model import ModelConfig, Transformer
from speculative import (check_same_tokenizer, generate, generate_batch, logits_to_probs, predicted_speedup,
                         speculative_generate)
from tokenizer import Tokenizer


def tiny(seed, vocab_size=64, std=0.5, **kw):
    torch.manual_seed(seed)
    shape = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, max_seq_len=128)
    config = ModelConfig(vocab_size=vocab_size, **{**shape, **kw})
    model = Transformer(config)
    model.init_weights(std)
    return model.eval()


def noisy_copy(model, noise, seed, vocab_size=None):
    """A draft that agrees with the target on some tokens: its weights plus noise (optionally a padded vocab)."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**model.config.__dict__, "vocab_size": vocab_size or model.config.vocab_size})
    draft = Transformer(config)
    state = {k: v + noise * torch.randn_like(v) for k, v in model.state_dict().items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # pad the vocabulary with random rows
        if k in state and vocab_size:
            extra = torch.randn(vocab_size - state[k].shape[0], state[k].shape[1])
            state[k] = torch.cat([state[k], extra])
    draft.load_state_dict(state, strict=False)
    return draft.eval()


PROMPT = [5, 17, 3, 42, 8, 8, 1]


@pytest.mark.parametrize("draft_kind", ["noisy", "unrelated", "padded-vocab"])
@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_greedy_speculative_equals_greedy_target(draft_kind, gamma):
    target = tiny(0)
    draft = {"noisy": lambda: noisy_copy(target, 0.05, 1), "unrelated": lambda: tiny(2, n_layers=1),
             "padded-vocab": lambda: noisy_copy(target, 0.05, 3, vocab_size=80)}[draft_kind]()
    expected = generate(target, PROMPT, 50)
    out, stats = speculative_generate(target, draft, PROMPT, 50, gamma=gamma)
    assert out == expected
    assert stats["target_calls"] == stats["rounds"] + 1  # + the prefill
    if draft_kind != "unrelated":
        assert 0 < stats["acceptance_rate"] < 1  # both branches (accept, reject) were exercised


def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    """generate_batch: several left-padded prompts per forward pass give each prompt's own greedy tokens, each
    cut after its eos (one row stopping early, the others going on)."""
    model = tiny(0)
    prompts = [PROMPT, [9, 2], list(range(3, 20)), [11]]
    alone = [generate(model, p, 30) for p in prompts]
    assert generate_batch(model, prompts, 30) == alone
    eos = alone[1][4]
    assert generate_batch(model, prompts, 30, eos_id=eos) == [generate(model, p, 30, eos_id=eos) for p in prompts]


def test_batched_sampling_draws_each_row_from_its_own_generator():
    """With one generator per row, a row's sample is the same whatever rows are beside it (distill.py draws each
    prompt under its own seed, so its teacher pool does not depend on the batch size or the number of processes)."""
    model = tiny(0)
    prompts = [PROMPT, [9, 2], list(range(3, 20))]

    def drawn(rows):
        gens = [torch.Generator().manual_seed(100 + i) for i in rows]
        return generate_batch(model, [prompts[i] for i in rows], 20, temperature=1.0, generators=gens)
    together = drawn([0, 1, 2])
    assert [drawn([i])[0] for i in range(3)] == together
    assert together != generate_batch(model, prompts, 20)  # sampled, not greedy


def test_generate_equals_uncached_argmax():
    """The cached decode loop against recomputing the whole sequence without a cache at every step."""
    model = tiny(0)
    ids = list(PROMPT)
    for _ in range(20):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(model, PROMPT, 20) == ids[len(PROMPT):]


def test_draft_equal_to_target_accepts_everything():
    target = tiny(0)
    out, stats = speculative_generate(target, target, PROMPT, 40, gamma=4, temperature=1.0)
    assert stats["acceptance_rate"] == 1.0 and stats["rejected"] == 0
    assert stats["mean_accepted_tokens"] == 5.0  # gamma + the bonus token, every round
    assert len(out) == 40


def test_eos_stops():
    target, draft = tiny(0), noisy_copy(tiny(0), 0.05, 1)
    full = generate(target, PROMPT, 30)
    eos = full[12]
    cut = full[:full.index(eos) + 1]
    assert generate(target, PROMPT, 30, eos_id=eos) == cut
    assert generate(target, PROMPT, 30, eos_id=eos, sync_every=4) == cut
    for gamma in (1, 3, 5):
        assert speculative_generate(target, draft, PROMPT, 30, gamma=gamma, eos_id=eos)[0] == cut


# -----------------------------------------------------------------------------
# Sampling follows the target distribution exactly


def chi_square_pvalue(counts, expected):
    """Pearson's chi-square test; cells expected to hold fewer than 5 are pooled into one."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    expected = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    stat = ((counts - expected) ** 2 / expected).sum()
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


@torch.no_grad()
def exact_joint(model, prompt, vocab, **processing):
    """P(x1, x2 | prompt) under the model's processed distributions, [vocab * vocab]."""
    p1 = logits_to_probs(model(torch.tensor([prompt]))[0, -1], **processing)
    rows = [p1[a] * logits_to_probs(model(torch.tensor([prompt + [a]]))[0, -1], **processing)
            for a in range(vocab)]
    return torch.stack(rows).flatten().double()


@pytest.mark.parametrize("gamma,processing", [(3, dict(temperature=1.0)),
                                              (1, dict(temperature=0.8, top_k=4))])
def test_sampled_tokens_follow_the_target_distribution(gamma, processing):
    """Two tokens per run cover accepting, rejecting + residual draws, later drafts of a round (gamma 3) and the
    bonus token (gamma 1). The same samples tested against the draft's distribution must fail: the test has power."""
    V, n = 6, 1500
    target, draft = tiny(0, vocab_size=V, std=1.0), tiny(1, vocab_size=V, std=1.0)
    prompt = [2]
    torch.manual_seed(1234)
    counts = torch.zeros(V * V, dtype=torch.float64)
    accepted = rejected = 0
    for _ in range(n):
        out, stats = speculative_generate(target, draft, prompt, 2, gamma=gamma, **processing)
        counts[out[0] * V + out[1]] += 1
        accepted, rejected = accepted + stats["accepted"], rejected + stats["rejected"]
    assert accepted > 100 and rejected > 100
    assert chi_square_pvalue(counts, n * exact_joint(target, prompt, V, **processing)) > 1e-3
    assert chi_square_pvalue(counts, n * exact_joint(draft, prompt, V, **processing)) < 1e-6


def test_processing_equals_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 10, None), (1.3, None, 0.8), (0.9, 20, 0.6),
                                      (1.0, 1, None), (1.0, None, 0.01)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k is not None:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p is not None:
            ref = TopPLogitsWarper(top_p)(None, ref)
        torch.testing.assert_close(logits_to_probs(logits, temperature, top_k, top_p), ref.softmax(-1))
    greedy = logits_to_probs(logits, 0.0)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(4))


def test_predicted_speedup_formula():
    """Leviathan et al. Theorem 3.8: (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
    a, g, c = 0.8, 4, 0.1
    assert predicted_speedup(a, g, c) == pytest.approx((1 - a ** 5) / ((1 - a) * (g * c + 1)))
    assert predicted_speedup(1.0, g, c) == pytest.approx(5 / 1.4)
    assert predicted_speedup(0.0, g, 0.0) == pytest.approx(1.0)
    # with a verification pass that costs v one-token steps instead of 1: a round costs g c + v
    assert predicted_speedup(a, g, c, 1.6) == pytest.approx((1 - a ** 5) / ((1 - a) * (g * c + 1.6)))


def test_different_tokenizers_are_refused():
    a = Tokenizer.train(["the cat sat on the mat " * 20], 300)
    b = Tokenizer.train(["a dog ran in the park " * 20], 300)
    check_same_tokenizer(a, a)
    with pytest.raises(ValueError, match="different tokenizers.*token id"):
        check_same_tokenizer(a, b)


def test_a_budget_past_the_context_is_a_clear_error():
    """The prompt and the new tokens must fit the model's context: one token more is refused, naming both sizes."""
    model = tiny(0)
    room = model.config.max_seq_len - len(PROMPT)
    with pytest.raises(ValueError, match=f"need {model.config.max_seq_len + 1} positions; the model's max_seq_len "
                                         f"is {model.config.max_seq_len}"):
        generate(model, PROMPT, room + 1)


def test_a_budget_that_fills_the_context_exactly_is_decoded():
    """The refusal above is not off by one: a budget that fills the context to its last position decodes, and the
    KV cache gives the tokens of greedy decoding by full forward passes without it, up to that last position."""
    model = tiny(0)
    room = model.config.max_seq_len - len(PROMPT)
    ids = list(PROMPT)
    with torch.no_grad():
        while len(ids) < model.config.max_seq_len:
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(model, PROMPT, room) == ids[len(PROMPT):]


def test_timing_a_step_records_no_autograd():
    """cost_ratio and verify_cost time decoding as it runs: without autograd (which, recorded, was timed too and made
    the KV cache require gradients, so a compiled step compiled again)."""
    model = tiny(0)
    assert any(p.requires_grad for p in model.parameters())
    speculative.step_time(model, n_tokens=2, steps=1, repeats=1)
    assert not any(b.requires_grad for b in model.buffers())


def test_the_verification_pass_runs_through_the_compiled_forward(monkeypatch):
    """Under --compile every cached pass goes through model_forward, the target's pass over gamma + 1 tokens too,
    as gpt-fast compiles its verification: on a GPU an eager 24-layer pass cost 11 compiled steps (gpu_check.py
    on an H200), which speculative decoding pays every round and verify_cost measured against a compiled step."""
    target, draft = tiny(0), noisy_copy(tiny(0), 0.05, 1)
    calls = []

    def counting_forward(model, idx, input_pos, unpadded=None):
        calls.append((model, idx.shape[1]))
        return model(idx, input_pos, unpadded=unpadded)
    monkeypatch.setattr(speculative, "model_forward", counting_forward)
    _, stats = speculative_generate(target, draft, PROMPT, 20, gamma=3)
    assert sum(m is target and n == 4 for m, n in calls) == stats["rounds"]
    calls.clear()
    speculative.step_time(target, n_tokens=4, steps=2, repeats=1)
    assert calls and all(m is target and n == 4 for m, n in calls)


def test_each_compiled_pass_on_a_gpu_starts_a_cuda_graph_step(monkeypatch):
    """compile_decoding on a GPU marks a new CUDA-graph step before every pass (what an H200 needed for plain and
    speculative decoding side by side: without it one of the two re-recorded its graphs every call, 38 against 697
    tokens/s). Checked here without a GPU: torch.compile and the mark replaced by recorders."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda fn, mode, **kw: (events.append(mode), fn)[1])
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("step"))
    monkeypatch.setattr(speculative, "model_forward", speculative.model_forward)  # (restored after the test)
    model = tiny(0)
    expected = generate(model, PROMPT, 5)
    speculative.compile_decoding()
    assert generate(model, PROMPT, 5) == expected
    assert events == ["reduce-overhead"] + ["step"] * 4  # the 4 steps after the prefill, each marked


def test_bench_measures_every_gamma_against_the_same_plain_decoding(tmp_path):
    """--bench --gamma 1,3: one row per gamma, each greedy output identical to plain greedy decoding of the target
    (the reference), the pooled acceptance of each a rate; the JSON's top row is the fastest one."""
    import json
    tok = Tokenizer.train(["the cell hands the call over to the next cell " * 20], 300)
    target = tiny(0, vocab_size=tok.n_vocab)
    for model, name in ((target, "target"), (noisy_copy(target, 0.3, 1), "draft")):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "bench.json"
    speculative.main(["--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--bench", "--gamma",
                      "1,3", "--prompt", "the cell", "--prompt", "hands over", "--max-new-tokens", "12",
                      "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["by_gamma"]
    assert [r["gamma"] for r in rows] == [1, 3]
    assert all(r["identical_outputs"] == "2/2" and 0 <= r["acceptance_rate"] <= 1 for r in rows)
    assert result["measured_speedup"] == max(r["measured_speedup"] for r in rows)


def test_a_list_of_gammas_without_bench_is_refused(capsys):
    with pytest.raises(SystemExit):
        speculative.get_args(["--target", "t", "--prompt", "hi", "--gamma", "1,2"])
    assert "a list of values needs --bench" in capsys.readouterr().err
    for bad in ("0", "1,x", ""):
        with pytest.raises(SystemExit):
            speculative.get_args(["--target", "t", "--bench", "--gamma", bad])
        assert "expected whole numbers >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_are_every_parameter_a_decode_step_reads(tied):
    """The memory roofline's numerator: every parameter's bytes (a tied head counted once), less the embedding table
    when the head is its own matrix (decoding looks up one row of it); in the model's dtype."""
    model = tiny(0, tie_embeddings=tied).to(torch.bfloat16)
    every = sum(p.numel() for p in model.parameters())  # (parameters() yields a shared tensor once)
    read = every - (0 if tied else model.model.embed_tokens.weight.numel())
    assert speculative.weight_bytes(model) == read * 2

