"""model.py's attention pattern run by FlexAttention equals the same pattern run by SDPA, and transformers' GPT-2.

FlexAttention compiles to C++ on a CPU (a few seconds per new shape family, once per process). Its backward has no
CPU kernel in torch, so a model that trains keeps SDPA on a CPU (support/attention.py); the gradient test below
checks that rule here and compares the two kernels' gradients where a GPU runs it.
"""
import warnings

import pytest
import torch

from model import GPT, GPTConfig, response_logprobs, visible
from support import attention, hf
from test_model import FIXTURES, TINY, left_pad, uncached_greedy

pytestmark = pytest.mark.skipif(attention.flex_attention is None, reason="this torch has no FlexAttention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def mode(monkeypatch):
    """Set support/attention.py's MODE for one test; the fallback notes it made are forgotten afterwards."""
    monkeypatch.setattr(attention, "_said", set())
    monkeypatch.setattr(attention, "_failed", False)
    return lambda m: monkeypatch.setattr(attention, "MODE", m)


def frozen(model):
    return model.to(DEVICE).eval().requires_grad_(False)


def count_block_masks(monkeypatch):
    """Count the forwards that ran FlexAttention (a BlockMask built) rather than a dense mask."""
    seen = []
    build = attention.build

    def counting(*args):
        out = build(*args)
        seen.append(isinstance(out, attention.BlockMask))
        return out
    monkeypatch.setattr(attention, "build", counting)
    return seen


def padded_batch(lengths, T, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths], T)


def test_left_padded_logits_match_transformers_and_sdpa(mode, monkeypatch):
    want = torch.load(FIXTURES / "tiny_gpt2_expected.pt", weights_only=True)
    model = frozen(hf.from_pretrained(FIXTURES / "tiny-gpt2"))
    ids, mask = want["padded_ids"].to(DEVICE), want["padded_mask"].to(DEVICE)
    assert (mask == 0).any() and (mask.all(1)).any()  # left-padded rows beside an unpadded one
    seen = count_block_masks(monkeypatch)
    mode("flex")
    with torch.no_grad():
        flex = model(ids, mask)
    mode("sdpa")
    with torch.no_grad():
        sdpa = model(ids, mask)
    assert seen == [True, False]
    real = mask.bool()
    torch.testing.assert_close(flex[real][:, :1000].cpu(), want["padded_logits"][real.cpu()], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_unpadded_logits_at_a_length_auto_takes(mode, monkeypatch):
    """At MIN_LEN positions "auto" takes FlexAttention for a frozen model; each left-padded row computes what it
    computes alone (unpadded, plain causal SDPA)."""
    mode("auto")
    T = attention.MIN_LEN[torch.device(DEVICE).type]
    torch.manual_seed(0)
    model = frozen(GPT(GPTConfig(**{**TINY, "block_size": T})))
    lengths = [T, T // 2, 37, T - 200]
    ids, mask = padded_batch(lengths, T)
    seen = count_block_masks(monkeypatch)
    with torch.no_grad():
        padded = model(ids.to(DEVICE), mask.to(DEVICE))
        for i, n in enumerate(lengths):
            alone = model(ids[i:i + 1, T - n:].to(DEVICE))[0]
            torch.testing.assert_close(padded[i, T - n:], alone, atol=1e-5, rtol=1e-5)
    assert seen == [True] and torch.isfinite(padded).all()  # padding queries read themselves, never an empty row


def test_greedy_generation_matches_transformers_token_for_token(mode, monkeypatch):
    want = torch.load(FIXTURES / "tiny_gpt2_expected.pt", weights_only=True)
    model = frozen(hf.from_pretrained(FIXTURES / "tiny-gpt2"))
    prompt, mask, tokens = want["greedy_prompt"], want["greedy_mask"], want["greedy_tokens"]
    seen = count_block_masks(monkeypatch)
    mode("flex")
    out = model.generate(prompt.to(DEVICE), mask.to(DEVICE), max_new_tokens=tokens.size(1) - prompt.size(1),
                         temperature=0)
    assert seen[0] is True  # the prompt's pass; the decoding steps keep SDPA (one query row: no block to skip)
    assert torch.equal(out.cpu(), tokens)


def test_cached_generation_equals_uncached_under_flex(mode):
    mode("flex")
    torch.manual_seed(1)
    model = frozen(GPT(GPTConfig(**TINY)))
    ids, mask = left_pad([[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]], 6)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    cached = model.generate(ids, mask, max_new_tokens=10, temperature=0)
    assert torch.equal(cached, uncached_greedy(model, ids, mask, 10))


def test_batches_of_other_sizes_and_lengths_compile_and_match_sdpa(mode):
    """Each batch size and block count compiles its own kernel (dynamic shapes made C++ that did not build on a CPU);
    no shape falls back, and the lengths are rounded up to whole blocks."""
    torch.manual_seed(0)
    model = frozen(GPT(GPTConfig(**{**TINY, "block_size": 300})))
    for lengths, T in (([150, 90, 20, 149], 150), ([200, 3, 131], 200), ([250, 77, 100, 12], 250)):
        ids, mask = padded_batch(lengths, T)
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)
        mode("flex")
        block = attention.BLOCK[ids.device.type]
        built = attention.build(visible(mask.bool().int().argmax(1)), len(lengths), T, T, ids.device, False)
        assert built.seq_lengths[0] % block == 0 and T <= built.seq_lengths[0] < T + block
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would warn
            with torch.no_grad():
                flex = model(ids, mask)
        mode("sdpa")
        with torch.no_grad():
            sdpa = model(ids, mask)
        real = mask.bool()
        torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_training_gradients_equal_sdpa_and_a_cpu_never_runs_flex_backward(mode, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).to(DEVICE).train()
    ids, mask = padded_batch([40, 17, 3, 29], 40)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    seen = count_block_masks(monkeypatch)
    grads = {}
    for m in ("flex", "sdpa"):
        mode(m)
        model.zero_grad()
        logp = response_logprobs(model, ids, mask, n_query=10)
        (logp * mask[:, 10:]).sum().backward()
        grads[m] = [p.grad.clone() for p in model.parameters()]
    assert seen == [DEVICE == "cuda", False]
    for a, b in zip(grads["flex"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_failing_compile_falls_back_to_sdpa_and_says_so_once(mode, monkeypatch):
    mode("flex")

    def broken():
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(attention, "flex", broken)
    model = frozen(GPT(GPTConfig(**TINY)))
    ids, mask = padded_batch([20, 5], 20)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with pytest.warns(UserWarning, match="falls back to SDPA") as said:
        with torch.no_grad():
            fell_back = model(ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: a second forward warns no more
        with torch.no_grad():
            again = model(ids, mask)
    assert len([w for w in said if "falls back" in str(w.message)]) == 1
    mode("sdpa")
    with torch.no_grad():
        sdpa = model(ids, mask)
    assert torch.equal(fell_back, sdpa) and torch.equal(again, sdpa)


def test_auto_takes_flex_only_for_long_padded_forwards_of_a_frozen_model_on_a_cpu(mode):
    mode("auto")
    cpu = torch.device("cpu")
    line = attention.MIN_LEN["cpu"]
    assert attention.use_flex(line, line, cpu, trainable=False)
    assert not attention.use_flex(line - 1, line - 1, cpu, trainable=False)  # too short to skip blocks
    assert not attention.use_flex(line, line, cpu, trainable=True)  # no CPU backward: SDPA for every forward
    assert not attention.use_flex(1, line, cpu, trainable=False)  # a decoding step
    mode("sdpa")
    assert not attention.use_flex(line, line, cpu, trainable=False)


def test_the_dense_mask_is_the_pattern_and_padding_inside_a_row_is_refused():
    valid = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    first = attention.first_real(valid)
    assert first.tolist() == [2, 0]
    m = attention.dense(visible(first), 2, 6, 6, "cpu")[:, 0]
    assert m[0, 4].tolist() == [False, False, True, True, True, False]  # its text up to itself
    assert m[0, 1].tolist() == [False, True, False, False, False, False]  # a padding query reads itself (SDPA)
    assert torch.equal(m[1], torch.ones(6, 6, dtype=torch.bool).tril())  # unpadded: plain causal
    decode = attention.dense(visible(first), 2, 1, 6, "cpu")[:, 0, 0]  # one query at the last position
    assert decode[0].tolist() == [False, False, True, True, True, True]
    with pytest.raises(ValueError, match="row 1 has padding between real tokens"):
        attention.first_real(torch.tensor([[0, 1, 1], [1, 0, 1]], dtype=torch.bool))


@pytest.mark.slow
def test_ppo_first_minibatch_ratio_is_still_exactly_one_under_flex(stages, tmp_path, mode, monkeypatch):
    """Reference policy and reward model (frozen) run FlexAttention; on a CPU the policy and the value network
    (trained) keep SDPA for their sampling, scoring and training forwards alike, so the ratio stays exactly 1."""
    from test_ppo import run_ppo
    mode("flex")
    seen = count_block_masks(monkeypatch)
    log = run_ppo(stages, tmp_path)[1:]
    assert any(seen) and (all(seen) if DEVICE == "cuda" else not all(seen))
    assert all(row["first_minibatch_ratio_dev"] == 0.0 and row["first_minibatch_approx_kl"] == 0.0 for row in log)
