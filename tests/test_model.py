"""model.py: GPT-2 numerics against Hugging Face, padding, the KV cache, sampling, precision, the optimizer."""
import math
from pathlib import Path

import pytest
import torch

from model import (GPT, GPTConfig, KVCache, autocast, last_token_index, response_logprobs, reward_at_eos, row_noise,
                   sample_token)
from support import hf
from support.optim import configure_optimizers

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


def left_pad(rows, length, pad=1000):
    """Left-pad lists of ids into (B, length) tokens and mask."""
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask


# --- against Hugging Face transformers (fixture made once in a side environment, see fixtures/make_tiny_gpt2.py) ---

@pytest.fixture(scope="module")
def hf_expected():
    return torch.load(FIXTURES / "tiny_gpt2_expected.pt", weights_only=True)


def test_logits_match_transformers(hf_expected):
    model = hf.from_pretrained(FIXTURES / "tiny-gpt2").eval()
    assert model.config.vocab_size == 1000 and model.config.padded_vocab_size == 1024
    with torch.no_grad():
        logits = model(hf_expected["ids"])
    assert logits.shape == (3, 12, 1024)  # the embedding table's 24 padding rows, masked
    torch.testing.assert_close(logits[..., :1000], hf_expected["logits"], atol=1e-4, rtol=1e-4)


def test_left_padded_logits_match_transformers(hf_expected):
    model = hf.from_pretrained(FIXTURES / "tiny-gpt2").eval()
    mask = hf_expected["padded_mask"]
    with torch.no_grad():
        logits = model(hf_expected["padded_ids"], mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real][:, :1000], hf_expected["padded_logits"][real], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(hf_expected):
    model = hf.from_pretrained(FIXTURES / "tiny-gpt2").eval()
    prompt, mask, want = hf_expected["greedy_prompt"], hf_expected["greedy_mask"], hf_expected["greedy_tokens"]
    out = model.generate(prompt, mask, max_new_tokens=want.size(1) - prompt.size(1), temperature=0)
    assert torch.equal(out[:, prompt.size(1):], want[:, prompt.size(1):])


# --- padding, positions, the KV cache ---

def test_left_padding_gives_the_unpadded_logits():
    model = tiny_model()
    rows = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30]]
    ids, mask = left_pad(rows, 9)
    with torch.no_grad():
        padded = model(ids, mask)
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))[0]
            torch.testing.assert_close(padded[i, 9 - len(r):], alone, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(padded).all()  # padding queries see themselves, never an empty row of keys


def test_head_from_cuts_positions_and_padded_vocab_rows_get_probability_zero():
    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        full, tail = model(ids), model(ids, head_from=8)
    assert full.shape == (2, 12, 1024)
    assert (full.softmax(-1)[..., 1000:] == 0).all() and (full.softmax(-1)[..., :1000] > 0).all()
    torch.testing.assert_close(tail, full[:, 8:])


def uncached_greedy(model, ids, mask, n):
    """Greedy decoding by re-running the whole sequence every step: the slow reference for the KV cache."""
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids, mask)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def test_cached_generation_equals_uncached_on_a_padded_batch():
    model = tiny_model(seed=1)
    ids, mask = left_pad([[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]], 6)
    cached = model.generate(ids, mask, max_new_tokens=12, temperature=0)
    assert cached.shape == (3, 18)
    assert torch.equal(cached, uncached_greedy(model, ids, mask, 12))


def test_generation_logprobs_match_the_training_forward():
    model = tiny_model(seed=2)
    ids, mask = left_pad([[3, 4, 5, 6], [9, 10]], 4)
    g = torch.Generator().manual_seed(0)
    out, logp = model.generate(ids, mask, max_new_tokens=6, temperature=0.7, generator=g, return_logprobs=True)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        again = response_logprobs(model, out, full_mask, n_query=4, temperature=0.7)
    torch.testing.assert_close(logp, again, atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_overflow():
    cache = KVCache(n_layer=1, batch=1, max_len=4, device="cpu")
    cache.extend(torch.ones(1, 4, dtype=torch.bool))
    cache.advance(torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="KV cache"):
        cache.extend(torch.ones(1, 1, dtype=torch.bool))


# --- sampling ---

def test_same_seed_same_samples_other_seed_other_samples():
    model = tiny_model()
    ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7]], 4)
    draw = lambda seed: model.generate(ids, mask, 16, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_sampler_draws_from_softmax_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(200_000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.7):
        tok, logp = sample_token(logits, temperature, g)
        want = torch.softmax(logits[0] / temperature, -1)
        freq = torch.bincount(tok, minlength=5).float() / len(tok)
        assert (freq - want).abs().max() < 0.01, (freq, want)  # 200k draws: 0.01 is 9 standard errors or more
        assert tok.max() < 5 and freq[4] == 0
        torch.testing.assert_close(logp, want.log()[tok])
    tok, _ = sample_token(logits[:3], 0.0)
    assert tok.tolist() == [0, 0, 0]


def test_padding_ids_are_never_sampled():
    model = tiny_model()
    with torch.no_grad():  # make the 24 padding rows irresistible if they were ever part of the distribution
        model.transformer.wte.weight[1000:] = 50.0 * model.transformer.ln_f.weight.sign()
    ids = torch.randint(0, 1000, (8, 5))
    out = model.generate(ids, max_new_tokens=30, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert out[:, 5:].max() < 1000


def test_eos_stops_a_row_and_pads_the_rest():
    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 5))
    first = model.generate(ids, max_new_tokens=6, temperature=0)[:, 5]
    eos = int(first[0])  # the token row 0 emits first: call it EOS
    out = model.generate(ids, max_new_tokens=6, temperature=0, eos_id=eos, pad_id=1000)
    assert out.shape == (2, 11)
    assert out[0, 5] == eos and (out[0, 6:] == 1000).all()


# --- precision ---

def test_bf16_autocast_is_close_to_fp32():
    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        with autocast(torch.device("cpu"), torch.bfloat16):
            low = model(ids)
    assert low.dtype == torch.bfloat16
    err = (low[..., :1000].float() - ref[..., :1000]).abs().max() / ref[..., :1000].abs().max()
    assert err < 0.05, err
    p, q = ref[..., :1000].softmax(-1), low[..., :1000].float().softmax(-1)
    assert (p * (p.log() - q.log())).sum(-1).mean() < 1e-2  # KL(fp32 || bf16) per position, in nats


# --- scalar head, reward at EOS ---

def test_scalar_head_init_and_shape():
    model = tiny_model(head="scalar", n_embd=256, n_head=4)
    w = model.score.weight
    assert w.shape == (1, 256) and model.score.bias.item() == 0
    assert abs(w.std().item() - 1 / math.sqrt(257)) < 0.25 / math.sqrt(257)
    assert model(torch.randint(0, 1000, (3, 7))).shape == (3, 7)


def test_reward_is_read_at_eos_whatever_the_padding():
    model = tiny_model(head="scalar")
    eos, query, response = 999, [5, 6, 7], [8, 9, 999]
    left = torch.tensor([[1000, 1000] + query + response])
    left_mask = (left != 1000).long()
    right = torch.tensor([query + response + [1000, 1000]])
    right_mask = (right != 1000).long()
    assert last_token_index(left_mask).item() == 7 and last_token_index(right_mask).item() == 5
    with torch.no_grad():
        r_left, r_right = reward_at_eos(model, left, left_mask, eos), reward_at_eos(model, right, right_mask, eos)
        r_alone = model(torch.tensor([query + response]))[0, -1]
    torch.testing.assert_close(r_left, r_right, atol=1e-5, rtol=0)
    torch.testing.assert_close(r_left[0], r_alone, atol=1e-5, rtol=0)


# --- optimizer ---

def test_a_row_without_its_eos_is_an_error_or_gets_the_no_eos_score():
    """The reward is the whole summary's: a row that ran out of length before its EOS is refused, naming it, or
    given the no-EOS score (PPO's penalty); the rows that end are read as before."""
    model = tiny_model(head="scalar")
    tokens = torch.tensor([[5, 6, 8, 999], [5, 6, 8, 9]])  # row 1 never ended
    mask = torch.ones_like(tokens)
    with pytest.raises(ValueError, match=r"rows \[1\] do not end with the EOS token 999"):
        reward_at_eos(model, tokens, mask, 999)
    with torch.no_grad():
        got = reward_at_eos(model, tokens, mask, 999, no_eos_score=-1.0)
        want = reward_at_eos(model, tokens[:1], mask[:1], 999)
    assert got[1].item() == -1.0
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)


def test_weight_decay_only_on_2d_weights():
    model = tiny_model()
    opt = configure_optimizers(model, lr=1e-3, weight_decay=0.1, verbose=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # the tied embedding counted once


def test_rows_with_their_own_noise_sample_the_same_alone_or_in_a_batch():
    model = tiny_model()
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], 4)
    noise = row_noise([101, 202, 303], 12)
    together = model.generate(ids, mask, 12, temperature=1.0, noise=noise)
    for i in range(3):  # each row alone, trimmed to its own length: the same tokens as beside the others
        n = int(mask[i].sum())
        alone = model.generate(ids[i:i + 1, 4 - n:], mask[i:i + 1, 4 - n:], 12, temperature=1.0, noise=noise[i:i + 1])
        assert torch.equal(alone[0, n:], together[i, 4:])
    other = model.generate(ids, mask, 12, temperature=1.0, noise=row_noise([1, 2, 3], 12))
    assert not torch.equal(other, together)


@pytest.mark.slow
def test_compiled_static_cache_decoding_samples_the_same_tokens():
    # The static cache attends over all its positions with the unwritten ones masked, and torch.compile runs the step
    # (a CUDA graph on GPUs): the same tokens and log-probs as the eager cache, after padded prompts, across calls.
    model = tiny_model(seed=3)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [9, 10], [11, 12, 13]], 5)
    noise = row_noise([7, 8, 9], 10)
    eager, logp = model.generate(ids, mask, 10, temperature=0.7, noise=noise, return_logprobs=True)
    for _ in range(2):  # the second call replays what the first compiled
        compiled, logp_c = model.generate(ids, mask, 10, temperature=0.7, noise=noise, return_logprobs=True,
                                          compile=True)
        assert torch.equal(compiled, eager)
        torch.testing.assert_close(logp_c, logp, atol=1e-5, rtol=1e-5)
    greedy = model.generate(ids, mask, 10, temperature=0, compile=True)
    assert torch.equal(greedy, uncached_greedy(model, ids, mask, 10))


def test_generation_longer_than_the_positions_is_refused():
    model = tiny_model()  # 64 positions
    with pytest.raises(ValueError, match="60 prompt \\+ 8 new tokens exceed the model's 64 positions"):
        model.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=8)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sampling_from_a_model_whose_weights_diverged_is_refused(temperature):
    """NaN logits would still yield tokens (argmax and the CDF search both return some index), so a diverged policy
    would be evaluated and saved as if it had written summaries; generate refuses instead."""
    model = tiny_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="logits are not finite"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, temperature=temperature)
