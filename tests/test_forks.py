"""Forks touch one place: each common variation of the pipeline changes one function or one constant, and a test
here applies it in a few lines and shows what changes."""


# ----------------------------------------------------------------------------------------------------------------
# fork (b): another rubric weight

def test_fork_b_a_rubric_blind_to_coverage(monkeypatch, tmp_path, capsys):
    """The rubric's weights are one constant, synth.AXIS_WEIGHTS. Here coverage is given no weight: the gold labeler
    can then no longer tell a summary that leaves out how long and the question (`shorter`) from a complete one; the
    simulated labelers, who judge by the gold totals, flip coins on such pairs; and comparisons collected under the
    old rubric are stale, so reward.py collects them anew."""
    import argparse
    import json

    import synth
    from model import GPT, GPTConfig
    from support import synth_comparisons

    records = [synth.synth_record(0, "valid", i) for i in range(200)]
    perfect = [synth.perfect_summary(r) for r in records]
    shorter = [synth.perturb_summary(r, "shorter") for r in records]
    labelers = synth.make_labelers(10, seed=0)

    def labelers_prefer_perfect():
        chose = [labelers[i % 10].compare(r, perfect[i], shorter[i])[0] for i, r in enumerate(records)]
        return chose.count(0) / len(chose)

    args = argparse.Namespace(train_posts=10, valid_posts=5, samples=2, labelers=3, temperature=0.7,
                              ref_fraction=0.2, seed=0, data_dir="data/synth")  # reward.py's collection flags
    sft_ckpt = {"model": GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8)).state_dict()}
    files = [tmp_path / "synth_train.json", tmp_path / "synth_valid.json"]
    for f in files:
        f.write_text("{}\n")
    (tmp_path / "synth_collected.json").write_text(json.dumps(synth_comparisons.collection_key(args, sft_ckpt)))
    assert synth.gold_win_rate(records, shorter, perfect) == 0.0  # 0.4 of coverage less: always worse
    assert labelers_prefer_perfect() > 0.9

    monkeypatch.setitem(synth.AXIS_WEIGHTS, "coverage", 0)  # the fork

    assert synth.gold_win_rate(records, shorter, perfect) == 0.5  # every pair a tie
    assert 0.35 < labelers_prefer_perfect() < 0.65
    assert synth_comparisons.stale_comparisons(tmp_path, files, synth_comparisons.collection_key(args, sft_ckpt))
    assert "the gold rubric or the simulated labelers changed since" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# fork (a): advantages without a value network (REINFORCE with a baseline)

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import ppo  # noqa: E402
from support.checkpoint import load_checkpoint  # noqa: E402


def reinforce_with_baseline(rewards, batch, args):
    """The fork itself, in place of ppo.estimate_advantages: each token's advantage is its return-to-go (gamma 1:
    the score plus the KL penalties still to come) minus the batch's mean return; no value network, so no value
    targets."""
    returns = rewards.flip(1).cumsum(1).flip(1) * batch["resp_mask"]
    return (returns - returns[:, 0].mean()) * batch["resp_mask"], None


@pytest.mark.slow
def test_fork_a_reinforce_with_a_baseline_trains_without_the_value_network(stages, tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "estimate_advantages", reinforce_with_baseline)  # the fork: one function
    models = {}
    real_build = ppo.build_models

    def build_and_keep(*args):  # only to look at the value network afterwards
        built = real_build(*args)
        models["value"] = built[2]
        return built

    monkeypatch.setattr(ppo, "build_models", build_and_keep)
    root, common = stages
    ppo.main([a if a != str(root / "out") else str(tmp_path) for a in common]
             + ["--sft", str(root / "out" / "sft.pt"), "--reward", str(root / "out" / "reward.pt"), "--episodes",
                "96", "--rollout-batch-size", "32", "--minibatch-size", "16", "--micro-batch-size", "8", "--lr",
                "1e-4", "--eval-every", "3", "--eval-n", "16", "--save-every", "3"])
    log = [json.loads(line) for line in (tmp_path / "ppo.log.jsonl").read_text().splitlines()]
    assert [row["update"] for row in log] == [0, 1, 2, 3] and load_checkpoint(tmp_path / "ppo.pt")["step"] == 3
    for row in log[1:]:
        assert row["first_minibatch_ratio_dev"] == 0.0 and row["approx_kl"] > 0.0  # an exact replay, then steps
        assert "value_loss" not in row and "explained_variance" not in row  # no value network trained
    # the value network is untouched: still the reward model's weights, bit for bit
    reward = load_checkpoint(root / "out" / "reward.pt")["model"]
    assert all(torch.equal(models["value"].state_dict()[k], v) for k, v in reward.items())
    # the policy moved away from the SFT policy
    sft = load_checkpoint(root / "out" / "sft.pt")["model"]
    assert any(not torch.equal(v, sft[k]) for k, v in load_checkpoint(tmp_path / "ppo.pt")["model"].items())
