"""dpo.py: the loss on a hand-computed example, summed summary log-probs, a short synthetic run, resume, invariance to
the micro-batch, bad input."""
import json
import math

import pytest
import torch

import data
import dpo
from model import GPT, GPTConfig, response_logprobs
from support.checkpoint import POLICY_STAGES, CheckpointError, load_checkpoint
from test_model import TINY, left_pad


def test_dpo_loss_on_a_hand_computed_example():
    logp0, logp1 = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0])
    ref0, ref1 = torch.tensor([-3.5, -2.0]), torch.tensor([-3.0, -2.0])
    choice = torch.tensor([0, 0])  # response 0 preferred in both rows
    loss, acc, margin = dpo.dpo_loss(logp0, logp1, ref0, ref1, choice, beta=0.5)
    # row 0: 0.5 * ((-3 + 3.5) - (-4 + 3)) = 0.75; row 1: 0.5 * ((-2 + 2) - (-1 + 2)) = -0.5
    want = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc.item() == 0.5 and margin.item() == pytest.approx(0.125, rel=1e-6)
    swapped, _, _ = dpo.dpo_loss(logp1, logp0, ref1, ref0, 1 - choice, beta=0.5)  # which side is 0 does not matter
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-6)


def test_a_policy_equal_to_its_reference_has_loss_log_2_whatever_the_beta():
    zeros = torch.zeros(3)
    for beta in (0.05, 0.5, 5.0):
        loss, _, margin = dpo.dpo_loss(zeros - 1, zeros - 2, zeros - 1, zeros - 2, torch.tensor([0, 1, 0]), beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and margin.item() == 0.0


def test_summary_logprobs_sum_each_summary_with_its_eos_whatever_the_padding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    pad, eos = 1000, 999
    q, _ = left_pad([[5, 6, 7, 8], [9, 10]], 4)
    r0 = torch.tensor([[11, 12, eos, pad], [13, eos, pad, pad]])
    r1 = torch.tensor([[14, eos, pad, pad], [15, 16, 17, eos]])
    with torch.no_grad():
        got0, got1 = dpo.summary_logprobs(model, q, r0, r1, pad)
        for i, (query, resp, got) in enumerate([(q[0], r0[0], got0[0]), (q[1], r1[1], got1[1])]):
            query, resp = query[query != pad], resp[resp != pad]
            tokens = torch.cat([query, resp])[None]
            want = response_logprobs(model, tokens, torch.ones_like(tokens), len(query)).sum()
            assert got.item() == pytest.approx(want.item(), abs=1e-4)  # EOS included, padding excluded


def run_dpo(stages, out, *extra):
    root, common = stages
    args = [a if a != str(root / "out") else str(out) for a in common]
    files = [str(root / "out" / "comparisons" / f"synth_{s}.json") for s in ("train", "valid")]
    dpo.main(args + ["--sft", str(root / "out" / "sft.pt"), "--comparisons", *files, "--batch-size", "32",
                     "--micro-batch-size", "16", "--val-size", "32", "--eval-every", "4", "--save-every", "4",
                     "--lr", "1e-3", "--warmup-steps", "2", *extra])
    return load_checkpoint(out / "dpo.pt", stage="dpo") if (out / "dpo.pt").exists() else None


@pytest.mark.slow
def test_a_short_run_starts_at_log_2_learns_its_comparisons_and_writes_a_policy(stages, tmp_path):
    ckpt = run_dpo(stages, tmp_path, "--epochs", "3")
    log = [json.loads(line) for line in (tmp_path / "dpo.log.jsonl").read_text().splitlines()]
    # the first batch: the policy is its reference, every margin 0 (the same forward: no kernel differs)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and log[0]["margin"] == 0.0
    assert log[-1]["loss"] < log[0]["loss"] - 0.05 and log[-1]["accuracy"] > 0.5  # it fits what it trains on
    metrics = ckpt["metrics"]
    assert metrics["held_out"]["n"] > 0 and 0 <= metrics["held_out"]["accuracy"] <= 1
    assert metrics["val_before"]["margin"] == 0.0
    assert load_checkpoint(tmp_path / "dpo.pt", stage=POLICY_STAGES, task="synth")["stage"] == "dpo"
    sft = load_checkpoint(stages[0] / "out" / "sft.pt")
    assert any(not torch.equal(ckpt["model"][k], v) for k, v in sft["model"].items())
    assert not (tmp_path / "dpo.resume.pt").exists()


@pytest.mark.slow
def test_resume_equals_uninterrupted(stages, tmp_path):
    whole = run_dpo(stages, tmp_path / "a")
    assert run_dpo(stages, tmp_path / "b", "--stop-after", "4") is None
    resumed = run_dpo(stages, tmp_path / "b", "--resume")
    assert all(torch.equal(whole["model"][k], v) for k, v in resumed["model"].items())


@pytest.mark.slow
def test_the_micro_batch_changes_only_float_rounding(stages, tmp_path):
    big = run_dpo(stages, tmp_path / "a")
    small = run_dpo(stages, tmp_path / "b", "--micro-batch-size", "8")
    for k, v in big["model"].items():
        torch.testing.assert_close(small["model"][k], v, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_missing_comparisons_and_a_checkpoint_of_another_stage_are_refused(stages, tmp_path):
    root, common = stages
    args = [a if a != str(root / "out") else str(tmp_path) for a in common]
    with pytest.raises(data.DataError, match=r"synth_train.json is missing: dpo.py trains on the comparisons"):
        dpo.main(args + ["--sft", str(root / "out" / "sft.pt")])
    files = [str(root / "out" / "comparisons" / f"synth_{s}.json") for s in ("train", "valid")]
    with pytest.raises(CheckpointError, match="reward.pt: is a reward checkpoint, expected a sft checkpoint"):
        dpo.main(args + ["--sft", str(root / "out" / "reward.pt"), "--comparisons", *files])
    assert not (tmp_path / "dpo.pt").exists()
