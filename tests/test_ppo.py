"""ppo.py: the RLHF math against hand-computed examples, the models' wiring, and a short synthetic run."""
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import data  # noqa: E402
import ppo  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from support.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402

# --- the math, by hand ---

def test_score_lands_on_the_eos_of_a_padded_response():
    # [t0, t1, EOS, PAD, PAD]: KL penalties on the three real tokens, the score on the EOS (index 2), nothing after
    mask = torch.tensor([[1.0, 1, 1, 0, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0, -9.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5, -1.0, -1.0]])
    rewards, kl = ppo.shape_rewards(torch.tensor([2.0]), logp, ref_logp, mask, beta=0.1)
    assert kl.tolist() == [[0.5, -1.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0, 0.0]]))
    # without EOS the whole response is real: the score lands on its last token
    rewards, _ = ppo.shape_rewards(torch.tensor([-1.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), 0.1)
    assert rewards.tolist() == [[0.0, 0.0, -1.0]]


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])  # the last position is padding: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas: t2 = 1 - 0.7 = 0.3; t1 = 0 + 0.7 - 0.6 = 0.1; t0 = 0 + 0.6 - 0.5 = 0.1
    a2 = 0.3
    a1 = 0.1 + 0.95 * a2
    a0 = 0.1 + 0.95 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]]))
    # gamma 1, lambda 1: every advantage is the return-to-go minus the value
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3, 0.0]]))


def test_rloo_advantages_by_hand():
    # two prompts, k = 2 samples each; per-token rewards (the KL penalty on each token, the score at the EOS)
    rewards = torch.tensor([[-0.1, 1.0, 0.0], [0.2, -0.5, 0.0], [0.0, 0.0, 3.0], [-0.2, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    adv = ppo.rloo_advantages(rewards, mask, k=2)
    # R = 0.9, -0.3 | 3.0, -0.1; with k = 2 the baseline is the other sample's R
    want = torch.tensor([0.9 + 0.3, -0.3 - 0.9, 3.0 + 0.1, -0.1 - 3.0])[:, None] * mask
    torch.testing.assert_close(adv, want)
    # k = 4, one prompt: baseline of sample i = (sum of the others) / 3
    adv4 = ppo.rloo_advantages(rewards, mask, k=4)
    R = torch.tensor([0.9, -0.3, 3.0, -0.1])
    torch.testing.assert_close(adv4, (R - (R.sum() - R) / 3)[:, None] * mask)
    assert adv4[:, 0].sum().abs() < 1e-6  # leave-one-out advantages of a prompt sum to 0


def test_masked_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    w = ppo.masked_whiten(x, mask)
    real = torch.tensor([1.0, 2, 3, 4, 5])
    torch.testing.assert_close(w[mask.bool()], (real - 3) / real.var(unbiased=False).sqrt(), atol=1e-6, rtol=1e-6)
    assert (w[~mask.bool()] == 0).all()
    assert ppo.masked_mean(x, mask).item() == 3.0


def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac, approx_kl = ppo.policy_loss(new, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * float((new ** 2).mean()))
    loss, clipfrac, approx_kl = ppo.policy_loss(old, old, adv, mask)
    assert approx_kl.item() == 0 and clipfrac.item() == 0 and loss.item() == pytest.approx(-float(adv.mean()))


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1]])
    ret = torch.tensor([[1.0, 1.0]])
    loss, clipfrac = ppo.value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: clipped to 0.2 -> max(0.25, 0.64) = 0.64; token 1: inside the clip -> max(0.81, 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKL(beta=0.1, target=6.0, horizon=10_000)
    assert ctl.update(12.0, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    ctl = ppo.AdaptiveKL(beta=0.1, target=6.0, horizon=10_000)
    assert ctl.update(5.4, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert ppo.AdaptiveKL(0.1, 6.0).update(6.0, 512) == pytest.approx(0.1)


def test_micro_batch_losses_add_up_to_the_minibatch_token_mean():
    # two micro-batches with different numbers of real tokens: each divides by the whole minibatch's count, so
    # their sum is the token mean over the minibatch (not the mean of two per-micro-batch means)
    torch.manual_seed(0)
    logp, old, adv = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.tensor([[1.0] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0], [1] + [0] * 5])
    whole, _, _ = ppo.policy_loss(logp, old, adv, mask)
    n = mask.sum().item()
    parts = [ppo.policy_loss(logp[s], old[s], adv[s], mask[s], n=n)[0] for s in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(parts[0] + parts[1], whole)
    per_part_mean = sum(ppo.policy_loss(logp[s], old[s], adv[s], mask[s])[0] for s in (slice(0, 1), slice(1, 4))) / 2
    assert abs(per_part_mean - whole) > 1e-3  # the old way would have weighted the two parts' tokens unequally
    v, ov, ret = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(sum(ppo.value_loss(v[s], ov[s], ret[s], mask[s], n=n)[0]
                                   for s in (slice(0, 3), slice(3, 4))), ppo.value_loss(v, ov, ret, mask)[0])


def test_each_episode_has_its_own_seed_and_each_process_its_share_of_every_minibatch(monkeypatch):
    seeds = ppo.episode_seeds(seed=0, update=3, n=8)
    assert len(set(seeds)) == 8 and seeds[:4] == ppo.episode_seeds(0, 3, 4)  # an episode's seed: (seed, update, e)
    assert not set(seeds) & set(ppo.episode_seeds(0, 4, 8)) and not set(seeds) & set(ppo.episode_seeds(1, 3, 8))
    assert ppo.my_episodes(8, 4).tolist() == list(range(8))  # one process samples everything, in order
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(ppo.my_episodes(8, 4).tolist())
    assert shares == [[0, 1, 4, 5], [2, 3, 6, 7]]  # minibatches [0..3] and [4..7], half of each per process


# --- the pipeline ---

def run_ppo(stages, out, *extra):
    root, common = stages
    args = [a if a != str(root / "out") else str(out) for a in common]
    ppo.main(args + ["--sft", str(root / "out" / "sft.pt"), "--reward", str(root / "out" / "reward.pt"),
                     "--episodes", "192", "--rollout-batch-size", "32", "--minibatch-size", "16",
                     "--micro-batch-size", "8", "--lr", "1e-4", "--eval-every", "3", "--eval-n", "16",
                     "--save-every", "3", *extra])
    return [json.loads(line) for line in (out / "ppo.log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_value_network_is_a_separate_copy_of_the_reward_model(stages):
    root, common = stages
    args = ppo.parse_args(common + ["--sft", str(root / "out" / "sft.pt"), "--reward", str(root / "out" /
                                                                                             "reward.pt")])
    policy, ref, value, rm = ppo.build_models(args, data.get_tokenizer(data.SYNTH_TOKENIZER), torch.device("cpu"))
    assert not {id(p) for p in value.parameters()} & {id(p) for p in rm.parameters()}
    assert not {id(p) for p in policy.parameters()} & {id(p) for p in ref.parameters()}
    rm_state = load_checkpoint(root / "out" / "reward.pt")
    assert all(torch.equal(value.state_dict()[k], v) for k, v in rm_state["model"].items())
    assert value.score.bias.item() == pytest.approx(rm_state["norm_bias"])  # normalization bias included
    assert not any(p.requires_grad for p in list(rm.parameters()) + list(ref.parameters()))
    assert all(p.requires_grad for p in list(value.parameters()) + list(policy.parameters()))


@pytest.mark.slow
def test_short_run_first_ratio_is_one_kl_finite_score_moves(stages, tmp_path):
    log = run_ppo(stages, tmp_path)
    assert len(log) == 7 and log[0]["update"] == 0 and "gold_win_rate" in log[0]  # the SFT policy's evaluation
    log = log[1:]
    for row in log:
        assert row["first_minibatch_ratio_dev"] == 0.0 and row["first_minibatch_approx_kl"] == 0.0
        assert math.isfinite(row["kl"]) and math.isfinite(row["value_loss"])
        for key in ("score", "rlhf_reward", "entropy", "approx_kl", "clipfrac", "value_clipfrac",
                    "explained_variance", "length", "eos_fraction", "lr", "episodes_per_s"):
            assert key in row
    assert log[0]["kl"] == pytest.approx(0.0, abs=0.05)  # the first batch comes from the SFT policy itself
    # A later KL is the mean of 32 samples of a KL near 0, of either sign: its size or sign says nothing. That the
    # policy moved away from the reference shows as log-ratios that no longer cancel to exactly 0 (as they would
    # against a reference that moved with it), and as steps within every update: approx-KL is a mean of squared
    # log-ratio changes, 0 only if no step changed any log-prob
    assert all(row["kl"] != 0.0 for row in log[1:]) and all(row["approx_kl"] > 0.0 for row in log)
    assert len({row["score"] for row in log}) > 1  # the reward model's scores, not one constant (-1 without an EOS)
    assert "gold_win_rate" in log[2] and len(log[2]["samples"]) == 3
    ckpt = load_checkpoint(tmp_path / "ppo.pt", stage="ppo")
    assert ckpt["step"] == 6 and "gold_win_rate" in ckpt["metrics"] and "sft_gold_win_rate" in ckpt["metrics"]
    assert (tmp_path / "ppo_step3.pt").exists() and not (tmp_path / "ppo.resume.pt").exists()


@pytest.mark.slow
def test_resume_equals_uninterrupted(stages, tmp_path):
    run_ppo(stages, tmp_path / "a")
    run_ppo(stages, tmp_path / "b", "--stop-after", "3")
    run_ppo(stages, tmp_path / "b", "--resume")
    a = load_checkpoint(tmp_path / "a" / "ppo.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "ppo.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rloo_runs_without_a_value_network_samples_each_prompt_k_times_and_resumes(stages, tmp_path, monkeypatch):
    built = []
    rollout = ppo.rollout

    def watching(policy, ref, value, rm, queries, *args):
        built.append((value, queries.cpu()))
        return rollout(policy, ref, value, rm, queries, *args)
    monkeypatch.setattr(ppo, "rollout", watching)
    log = run_ppo(stages, tmp_path / "a", "--estimator", "rloo", "--samples-per-prompt", "4")[1:]
    assert all(value is None for value, _ in built)
    groups = built[0][1].view(-1, 4, built[0][1].size(1))  # each prompt 4 times, adjacent
    assert all(torch.equal(g[0], g[i]) for g in groups for i in range(4))
    assert all(row["first_minibatch_ratio_dev"] == 0.0 and "value_loss" not in row for row in log)
    state = torch.load(tmp_path / "a" / "ppo_step3.pt", weights_only=True)
    assert state["stage"] == "ppo"
    run_ppo(stages, tmp_path / "b", "--estimator", "rloo", "--samples-per-prompt", "4", "--stop-after", "3")
    run_ppo(stages, tmp_path / "b", "--estimator", "rloo", "--samples-per-prompt", "4", "--resume")
    a = load_checkpoint(tmp_path / "a" / "ppo.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "ppo.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(stages, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ppo.value_loss

    def breaks_in_update_4(*args, **kwargs):  # 4 micro-batches x 4 epochs = 16 calls per update
        calls["n"] += 1
        loss, clipfrac = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 48 else loss), clipfrac

    monkeypatch.setattr(ppo, "value_loss", breaks_in_update_4)
    with pytest.raises(FloatingPointError, match="update 4: the loss is nan"):
        run_ppo(stages, tmp_path)
    assert load_checkpoint(tmp_path / "ppo.resume.pt", stage="ppo")["step"] == 3
    assert (tmp_path / "ppo_step3.pt").exists() and not (tmp_path / "ppo.pt").exists()


@pytest.mark.slow
def test_checkpoints_of_the_wrong_stage_are_refused(stages, tmp_path):
    root, common = stages
    args = [a if a != str(root / "out") else str(tmp_path) for a in common]
    with pytest.raises(ppo.CheckpointError, match="is a sft checkpoint, expected a reward checkpoint"):
        ppo.main(args + ["--sft", str(root / "out" / "sft.pt"), "--reward", str(root / "out" / "sft.pt")])
    with pytest.raises(ppo.CheckpointError, match="is a reward checkpoint, expected a sft checkpoint"):
        ppo.main(args + ["--sft", str(root / "out" / "reward.pt"), "--reward", str(root / "out" / "reward.pt")])
    assert not (tmp_path / "ppo.pt").exists()


def max_difference_but_key_biases(one, two):
    """The largest difference between two state dicts' parameters, the attention's key biases (the middle third of
    each c_attn.bias) left out: a softmax ignores a shift of its scores, so their gradients are float noise, which
    Adam's normalized steps turn into moves of up to lr each. Two runs that differ only in rounding can end up to
    2 x lr x steps apart there (9e-6 in the runs below, where 16 steps at lr 1e-4 allow 3e-3), 1e-7 elsewhere."""
    def kept(k, v):  # q, k and v biases in one tensor (model.py splits c_attn's output in that order)
        if k.endswith("attn.c_attn.bias"):
            q, _, value = v.chunk(3)
            return torch.cat([q, value])
        return v
    return max((kept(k, one[k]) - kept(k, two[k])).abs().max().item() for k in one)


@pytest.mark.slow
def test_micro_and_sample_batch_sizes_change_the_result_only_by_float_rounding(stages, tmp_path):
    # Each episode samples from its own seed and every loss is a token mean over the whole minibatch, so splitting
    # the work differently (4 or 8 episodes per forward; 5 or all 32 sampled at once) gives the same samples and
    # the same steps. Before that, micro-batch 16 against 8 gave 0 of 16 equal samples on the same seed.
    a = run_ppo(stages, tmp_path / "a", "--episodes", "64")
    b = run_ppo(stages, tmp_path / "b", "--episodes", "64", "--micro-batch-size", "4", "--sample-batch-size", "5")
    assert len(a) == len(b) == 3
    for row_a, row_b in zip(a[1:], b[1:]):
        for key in ("score", "kl", "length", "eos_fraction", "policy_loss", "value_loss", "entropy", "approx_kl"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-6), key
        assert row_b["first_minibatch_ratio_dev"] == 0.0
    assert a[2]["samples"] == b[2]["samples"]
    wa = load_checkpoint(tmp_path / "a" / "ppo.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "ppo.pt")["model"]
    assert wa.keys() == wb.keys() and max_difference_but_key_biases(wa, wb) < 1e-4
    assert any(not torch.equal(wa[k], v) for k, v in load_checkpoint(stages[0] / "out" / "sft.pt")["model"].items())


@pytest.mark.slow
def test_fewer_posts_than_a_rollout_batch_is_a_clear_error(stages, tmp_path):
    with pytest.raises(data.DataError, match="960 training posts make no rollout batch of --rollout-batch-size 1024"):
        run_ppo(stages, tmp_path, "--rollout-batch-size", "1024", "--episodes", "2048")
    assert not (tmp_path / "ppo.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--minibatch-size", "64"], "--minibatch-size 64 is larger than --rollout-batch-size 32"),
    (["--sample-batch-size", "0"], "argument --sample-batch-size: must be at least 1, got 0"),
    (["--ppo-epochs", "0"], "argument --ppo-epochs: must be at least 1, got 0"),
    (["--micro-batch-size", "-8"], "argument --micro-batch-size: must be at least 1, got -8"),
    (["--eval-every", "0"], "argument --eval-every: must be at least 1, got 0"),
    (["--rollout-batch-size", "0"], "argument --rollout-batch-size: must be at least 1, got 0"),
    (["--episodes", "16"], "--episodes 16 is less than one --rollout-batch-size 32"),
    (["--estimator", "rloo", "--samples-per-prompt", "1"], "--estimator rloo needs --samples-per-prompt of at "
                                                           "least 2"),
    (["--samples-per-prompt", "3"], "--rollout-batch-size 32 is not a multiple of --samples-per-prompt 3"),
])
def test_batch_flags_that_cannot_work_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        ppo.parse_args(["--task", "synth", "--rollout-batch-size", "32", "--minibatch-size", "16", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_resume_on_another_reward_model_or_sft_is_refused_by_name(stages, tmp_path):
    """--reward and --sft may name another path on a resume (a moved file), but not other weights: the resume state
    records each input's digest. Without that a resume trained the rest of the run against another reward model."""
    root, _ = stages
    run_ppo(stages, tmp_path, "--stop-after", "1")
    rm_ckpt = load_checkpoint(root / "out" / "reward.pt")
    rm = model_from_checkpoint(rm_ckpt)
    with torch.no_grad():
        rm.score.bias += 1.0
    save_checkpoint(tmp_path / "other_reward.pt", rm, stage="reward", task="synth", tokenizer=rm_ckpt["tokenizer"],
                    norm_bias=rm.score.bias.item())
    with pytest.raises(CheckpointError, match="--reward .*other_reward.pt is not the file it started with"):
        run_ppo(stages, tmp_path, "--resume", "--reward", str(tmp_path / "other_reward.pt"))
    sft_ckpt = load_checkpoint(root / "out" / "sft.pt")
    wider = GPT(GPTConfig(**{**sft_ckpt["config"], "n_embd": 2 * sft_ckpt["config"]["n_embd"]}))
    save_checkpoint(tmp_path / "wider_sft.pt", wider, stage="sft", task="synth", tokenizer=sft_ckpt["tokenizer"])
    with pytest.raises(CheckpointError, match="--sft .*wider_sft.pt is not the file it started with"):
        run_ppo(stages, tmp_path, "--resume", "--sft", str(tmp_path / "wider_sft.pt"))
    assert load_checkpoint(tmp_path / "ppo.resume.pt")["step"] == 1  # the refused runs wrote nothing
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "reward.pt").write_bytes((root / "out" / "reward.pt").read_bytes())
    log = run_ppo(stages, tmp_path, "--resume", "--reward", str(tmp_path / "moved" / "reward.pt"))  # the same bytes
    assert log[-1]["update"] == 6


@pytest.mark.slow
def test_weights_that_diverge_on_the_last_update_are_never_written(stages, tmp_path, monkeypatch):
    real, calls = ppo.optimizer_step, {"n": 0}

    def diverges_last(optimizer, params, *args):  # 6 updates x 4 epochs x 2 minibatches = 48 steps
        params = list(params)
        real(optimizer, params, *args)
        calls["n"] += 1
        if calls["n"] == 48:
            with torch.no_grad():
                params[0].fill_(float("nan"))

    monkeypatch.setattr(ppo, "optimizer_step", diverges_last)  # the final evaluation samples from it first
    with pytest.raises(FloatingPointError, match="logits are not finite .* its weights diverged"):
        run_ppo(stages, tmp_path)
    assert calls["n"] == 48 and not (tmp_path / "ppo.pt").exists() and not (tmp_path / "ppo_step6.pt").exists()
    assert load_checkpoint(tmp_path / "ppo.resume.pt")["step"] == 3  # the last good state, kept
