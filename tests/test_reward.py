"""reward.py: the preference loss, rewards at EOS, normalization, a short synthetic run, resume, bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import data  # noqa: E402
import locations  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import synth  # noqa: E402
from support import comparisons, synth_comparisons  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from support.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402

SMALL = ["--train-posts", "960", "--valid-posts", "160", "--batch-size", "32", "--micro-batch-size", "16",
         "--val-size", "64", "--eval-every", "5", "--norm-n", "64", "--lr", "2e-3", "--temperature", "0.7",
         "--epochs", "2"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny synthetic dataset and an SFT model trained on it for a few seconds."""
    root = tmp_path_factory.mktemp("rm")
    synth.write_synth(root / "data", seed=0, sizes=dict(train=960, valid=200, test=16, transfer=8))
    sft.main(["--task", "synth", "--data-dir", str(root / "data"), "--out-dir", str(root / "sft"), "--cache-dir",
              str(root / "cache"), "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "16",
              "--lr", "3e-3", "--epochs", "4", "--val-size", "32", "--sample-n", "8"])
    return root


def run_reward(root, out, *extra):
    out.mkdir(parents=True, exist_ok=True)
    reward.main(["--task", "synth", "--data-dir", str(root / "data"), "--sft", str(root / "sft" / "sft.pt"),
                 "--out-dir", str(out), "--cache-dir", str(root / "cache"), *SMALL, *extra])
    return json.loads((out / "reward.json").read_text()) if (out / "reward.json").exists() else None


def test_preference_loss_and_accuracy_on_a_hand_made_batch():
    r0, r1 = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, 0.5])
    loss, acc = reward.preference_loss(r0, r1, torch.tensor([0, 1, 0]))
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc.item() == pytest.approx(2 / 3)  # a tie is no correct prediction
    loss, acc = reward.preference_loss(r0, r1, torch.tensor([1, 0, 1]))
    assert acc.item() == 0.0 and loss.item() > want


def test_pair_rewards_read_each_response_at_its_eos():
    torch.manual_seed(0)
    rm = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16, head="scalar")).eval()
    pad, eos = 50, 49
    query = torch.tensor([[pad, pad, 1, 2, 3], [4, 5, 6, 7, 8]])
    r0 = torch.tensor([[9, 10, eos, pad], [11, eos, pad, pad]])
    r1 = torch.tensor([[12, eos, pad, pad], [13, 14, 15, eos]])
    a, b = reward.pair_rewards(rm, query, r0, r1, pad, eos)
    with torch.no_grad():
        for i in range(2):
            for resp, got in ((r0, a), (r1, b)):
                seq = torch.cat([query[i], resp[i]])
                seq = seq[seq != pad][None]  # the same tokens without any padding
                assert got[i].item() == pytest.approx(rm(seq)[0, -1].item(), abs=1e-5)


@pytest.mark.slow
def test_short_synthetic_run_fits_its_comparisons_and_normalizes_references(sft_run, tmp_path):
    metrics = run_reward(sft_run, tmp_path)
    lines = (tmp_path / "comparisons" / "synth_train.json").read_text().splitlines()
    assert len(lines) == 960 and all(json.loads(line)["split"] == "train" for line in lines)
    comps = data.read_comparisons(tmp_path / "comparisons" / "synth_valid.json")
    assert len(comps) == 160 and {c["split"] for c in comps} == {"valid2"}
    with_ref = sum("ref" in c["policies"] for c in comps) / len(comps)
    assert 0.1 < with_ref < 0.5  # mostly samples against samples (ref fraction 0.25, more when samples coincide)
    overall = metrics["accuracy"]["synth"]["overall"]
    # A barely trained SFT model sometimes rambles past the length limit; those pairs are dropped (and counted).
    assert overall["n"] >= 120 and 0 <= overall["accuracy"] <= 1, overall
    assert 0.5 < metrics["labeler_agreement"] <= 1.0
    # normalization: the references of training posts average 0 under the saved model
    ckpt = load_checkpoint(tmp_path / "reward.pt", stage="reward")
    assert ckpt["norm_bias"] == pytest.approx(ckpt["model"]["score.bias"].item())
    rm = model_from_checkpoint(ckpt).eval()
    args = reward.parse_args(["--task", "synth", "--cache-dir", str(sft_run / "cache")])
    refs = reward.reference_rewards(rm, data.load_split("synth", "train", sft_run / "data")[:64],
                                    data.get_tokenizer(data.SYNTH_TOKENIZER), args, torch.device("cpu"), None)
    assert abs(refs.mean()) < 1e-4 and metrics["reference_reward_after"] == pytest.approx(refs.mean(), abs=1e-5)
    assert metrics["reference_reward_before"] != metrics["reference_reward_after"]  # the bias really moved
    # Held out, this tiny RM is right on ~60% of 160 pairs (+- 4%; its untrained head alone gets 56%): too near
    # chance for "beats chance" to hold whatever the rounding. What training must do is lower the loss it minimizes
    # on the 960 comparisons it saw, well below ln 2 (an RM that tells no summaries apart); here 0.55 from 0.69.
    enc, spec = data.get_tokenizer(data.SYNTH_TOKENIZER), data.TASKS["synth"]
    arrays = data.prepare_comparisons(data.read_comparisons([tmp_path / "comparisons" / f"synth_{split}.json"
                                                             for split in ("train", "valid")]),
                                      enc, spec["query_len"], spec["rm_response_len"])
    train_rows, eval_rows, _ = reward.split_rows(arrays, args)
    r0, r1 = reward.all_rewards(rm, arrays, train_rows, args, enc, torch.device("cpu"), None)
    loss, _ = reward.preference_loss(*map(torch.from_numpy, (r0, r1, arrays["choice"][train_rows])))
    assert len(train_rows) == 960 and loss.item() < math.log(2) - 0.05, loss
    # and the held-out accuracy it reports is its own on every held-out pair (up to one pair at a rounding tie)
    r0, r1 = reward.all_rewards(rm, arrays, eval_rows, args, enc, torch.device("cpu"), None)
    right = (r1 > r0) == (arrays["choice"][eval_rows] == 1)
    assert len(eval_rows) == overall["n"] and abs(right.mean() - overall["accuracy"]) <= 1 / overall["n"]


@pytest.mark.slow
def test_resume_equals_uninterrupted(sft_run, tmp_path):
    run_reward(sft_run, tmp_path / "a")
    (tmp_path / "b" / "comparisons").mkdir(parents=True)
    for f in ("synth_train.json", "synth_valid.json"):  # the same comparisons for both runs
        (tmp_path / "b" / "comparisons" / f).write_bytes((tmp_path / "a" / "comparisons" / f).read_bytes())
    assert run_reward(sft_run, tmp_path / "b", "--stop-after", "4") is None
    run_reward(sft_run, tmp_path / "b", "--resume")
    a = load_checkpoint(tmp_path / "a" / "reward.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "reward.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_nan_loss_stops_before_the_weights(sft_run, tmp_path, monkeypatch):
    real = reward.train_step
    monkeypatch.setattr(reward, "train_step", lambda *args: (float("nan"), real(*args)[1]))
    with pytest.raises(FloatingPointError, match="step 1: the loss is nan; stopping before it reaches the weights; "
                                                 "no resume state had been written yet"):
        run_reward(sft_run, tmp_path)
    assert not (tmp_path / "reward.pt").exists() and not (tmp_path / "reward.resume.pt").exists()


@pytest.mark.slow
def test_wrong_task_and_wrong_tokenizer_are_refused(sft_run, tmp_path):
    rm_dir = tmp_path / "x"
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "reward.py"), "--task", "synth", "--data-dir",
                                     str(sft_run / "data"), "--out-dir", str(rm_dir), "--cache-dir",
                                     str(sft_run / "cache"), *a], capture_output=True, text=True, cwd=ROOT)
    batch18 = locations.SAMPLE / "comparisons" / "batch18.json"
    if batch18.exists():
        proc = run("--sft", str(sft_run / "sft" / "sft.pt"), "--comparisons", str(batch18))
        assert "comparisons of Reddit posts, but --task synth" in proc.stderr and "Traceback" not in proc.stderr
    other = GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "sft.pt", other, stage="sft", task="tldr", tokenizer="gpt2")
    proc = run("--sft", str(tmp_path / "sft.pt"))
    assert "sft.pt: a sft checkpoint of task tldr with tokenizer gpt2, but --task synth uses synth-words-v2" in (
        proc.stderr)
    proc = run("--sft", str(sft_run / "sft" / "sft.json"))
    assert "not a readable checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_collect_command_compares_several_policies_in_the_original_format(sft_run, tmp_path):
    (tmp_path / "sft_a.pt").write_bytes((sft_run / "sft" / "sft.pt").read_bytes())
    (tmp_path / "sft_b.pt").write_bytes((sft_run / "sft" / "sft.pt").read_bytes())
    proc = subprocess.run([sys.executable, str(ROOT / "synth.py"), "collect", str(tmp_path / "sft_a.pt"),
                           str(tmp_path / "sft_b.pt"), "--out", str(tmp_path / "c.json"), "--data-dir",
                           str(sft_run / "data"), "--n-posts", "40", "--temperature", "0.7"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = data.read_comparisons(tmp_path / "c.json")
    assert len(rows) == 40 and {r["split"] for r in rows} == {"valid2"} and {r["batch"] for r in rows} == {"c"}
    assert {p for r in rows for p in r["policies"]} <= {"sft_a", "sft_b", "ref"}
    assert {p for r in rows for p in r["policies"]} >= {"sft_a", "sft_b"}
    proc = subprocess.run([sys.executable, str(ROOT / "synth.py"), "collect", str(sft_run / "sft" / "sft.json"),
                           "--out", str(tmp_path / "d.json")], capture_output=True, text=True, cwd=ROOT)
    assert "not a readable checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d.json").exists()


def test_synth_comparisons_from_another_sft_model_are_collected_anew(tmp_path, capsys):
    import argparse
    args = argparse.Namespace(train_posts=10, valid_posts=5, samples=2, labelers=3, temperature=0.7, ref_fraction=0.2,
                              seed=0, data_dir="data/synth")
    sft_ckpt = {"model": GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8)).state_dict()}
    files = [tmp_path / "synth_train.json", tmp_path / "synth_valid.json"]
    key = synth_comparisons.collection_key(args, sft_ckpt)
    assert synth_comparisons.stale_comparisons(tmp_path, files, key)  # nothing collected yet
    for f in files:
        f.write_text("{}\n")
    assert synth_comparisons.stale_comparisons(tmp_path, files, key)  # files of unknown origin
    assert "no record of the sft.pt they came from" in capsys.readouterr().out
    (tmp_path / "synth_collected.json").write_text(json.dumps(key))
    assert not synth_comparisons.stale_comparisons(tmp_path, files, key)  # the same SFT model and settings: reused
    sft_ckpt["model"]["lm_head.weight"] = sft_ckpt["model"]["lm_head.weight"] + 1e-3  # sft.pt trained again
    assert synth_comparisons.stale_comparisons(tmp_path, files, synth_comparisons.collection_key(args, sft_ckpt))
    assert "they came from another sft.pt" in capsys.readouterr().out
    assert synth_comparisons.stale_comparisons(tmp_path, files, dict(key, temperature=1.0))
    assert "other settings: temperature" in capsys.readouterr().out


def test_synth_comparisons_judged_by_another_rubric_or_other_labelers_are_collected_anew(tmp_path, capsys,
                                                                                         monkeypatch):
    import argparse
    args = argparse.Namespace(train_posts=10, valid_posts=5, samples=2, labelers=3, temperature=0.7, ref_fraction=0.2,
                              seed=0, data_dir="data/synth")
    sft_ckpt = {"model": GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8)).state_dict()}
    files = [tmp_path / "synth_train.json", tmp_path / "synth_valid.json"]
    for f in files:
        f.write_text("{}\n")
    key = synth_comparisons.collection_key(args, sft_ckpt)
    (tmp_path / "synth_collected.json").write_text(json.dumps(key))
    assert not synth_comparisons.stale_comparisons(tmp_path, files, synth_comparisons.collection_key(args, sft_ckpt))
    monkeypatch.setattr(synth, "FALSE_COST", 0.4)  # the rubric's weights changed (was 0.5)
    assert synth_comparisons.stale_comparisons(tmp_path, files, synth_comparisons.collection_key(args, sft_ckpt))
    assert "the gold rubric or the simulated labelers changed" in capsys.readouterr().out
    monkeypatch.undo()
    real = synth.Labeler.compare
    monkeypatch.setattr(synth.Labeler, "compare", lambda self, rec, a, b: (real(self, rec, a, b)[0], 5))  # unsure
    assert synth_comparisons.stale_comparisons(tmp_path, files, synth_comparisons.collection_key(args, sft_ckpt))


def test_a_collection_killed_half_way_leaves_no_record_that_vouches_for_its_files(tmp_path, monkeypatch):
    """The record of what the comparisons came from goes before the files are rewritten and comes back after: a run
    killed in between (here: an error in the middle of collecting) makes the next run collect anew."""
    import argparse
    args = argparse.Namespace(train_posts=10, valid_posts=5, samples=2, labelers=3, temperature=0.7, ref_fraction=0.2,
                              seed=0, data_dir=str(tmp_path / "data"))
    sft_ckpt = {"model": GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8)).state_dict(),
                "config": dict(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8, head="lm"), "stage": "sft"}
    files = [tmp_path / "synth_train.json", tmp_path / "synth_valid.json"]
    for f in files:
        f.write_text("{}\n")
    key = synth_comparisons.collection_key(args, sft_ckpt)
    (tmp_path / "synth_collected.json").write_text(json.dumps(key))

    def killed(*a, **k):
        files[0].write_text("")  # half rewritten
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "collect", killed)
    monkeypatch.setattr(synth_comparisons, "load_split", lambda *a, **k: [])
    with pytest.raises(KeyboardInterrupt):
        synth_comparisons.collect_for_reward(args, None, sft_ckpt, files, key, torch.device("cpu"), torch.float32)
    assert not (tmp_path / "synth_collected.json").exists()
    assert synth_comparisons.stale_comparisons(tmp_path, files, key)


def test_comparisons_of_another_task_or_another_synthetic_world_are_refused():
    synthetic, reddit = [dict(id=f"{synth.WORLD}_0_train_7")], [dict(id="t3_js7re")]
    comparisons.check_task(synthetic, ["a.json"], "synth")
    comparisons.check_task(reddit, ["a.json"], "tldr")
    with pytest.raises(data.DataError, match="comparisons of Reddit posts, but --task synth"):
        comparisons.check_task(reddit + synthetic, ["a.json"], "synth")
    with pytest.raises(data.DataError, match="comparisons of the synthetic task, but --task tldr"):
        comparisons.check_task(reddit + [dict(id="synth0_0_train_7")], ["a.json"], "tldr")
    with pytest.raises(data.DataError, match=r"another synthetic world \(synth0\) than this synth.py's \("
                                             + synth.WORLD + r"\): collect them anew"):
        comparisons.check_task(synthetic + [dict(id="synth0_0_train_7")], ["a.json"], "synth")


@pytest.mark.slow
def test_a_nan_bias_or_metric_is_never_written(sft_run, tmp_path, monkeypatch):
    """A reward model that diverged after the last loss check scored the references NaN and still reported an
    accuracy; now reward.pt is refused and nothing is written."""
    real = reward.normalize

    def diverged(rm, *args):
        before, after = real(rm, *args)
        with torch.no_grad():
            rm.score.bias.fill_(float("nan"))
        return before, after

    monkeypatch.setattr(reward, "normalize", diverged)
    with pytest.raises(FloatingPointError, match="reward.pt: not written: .* is not finite"):
        run_reward(sft_run, tmp_path, "--train-posts", "128", "--valid-posts", "32", "--epochs", "1")
    assert not (tmp_path / "reward.pt").exists() and not (tmp_path / "reward.json").exists()
