"""Every stage under torchrun with 2 gloo CPU processes: SFT matches 1 process at the same global batch, reward and
PPO complete with one checkpoint each (PPO through a stop and a resume), and batch flags that do not split over the
processes are refused clearly; evaluation on 2 processes gives the numbers of 1. The stages run with --device cpu
(gloo) whatever GPUs the machine has; more processes than GPUs, or a GPU asked for where there is none, is a clear
error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import ppo  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import synth  # noqa: E402
from support.checkpoint import load_checkpoint  # noqa: E402
from test_ppo import max_difference_but_key_biases  # noqa: E402

SFT = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "16", "--micro-batch-size", "4",
       "--lr", "3e-3", "--epochs", "2", "--val-size", "24", "--sample-n", "12", "--eval-every", "20"]
REWARD = ["--train-posts", "192", "--valid-posts", "32", "--batch-size", "32", "--micro-batch-size", "8",
          "--norm-n", "48", "--val-size", "24", "--eval-every", "3", "--temperature", "0.7"]
PPO = ["--episodes", "64", "--rollout-batch-size", "32", "--minibatch-size", "16", "--micro-batch-size", "4",
       "--lr", "1e-4", "--eval-every", "1", "--eval-n", "8", "--save-every", "100"]


def run(script, *args, processes=1):
    """A stage as its own command: plain python, or under `torchrun --standalone --nproc_per_node=2`, always with
    --device cpu (gloo), so that the tests pass on machines with 0, 1 or more GPUs. One thread per process, so that
    two processes share a two-core CPU without waiting on each other's threads."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    args = [*args, "--device", "cpu"]
    return subprocess.run([sys.executable, *launch, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def pt_files(folder):
    return sorted(p.name for p in folder.glob("*.pt"))


def assert_same_matrices(one, two):
    """The weight matrices of two checkpoints agree. Not the biases: some cannot change the loss (the attention's key
    biases, since a softmax ignores a shift; for a reward model those that shift every reward alike, since the loss
    sees differences), so their gradients are float noise, which Adam's normalized steps turn into moves of up to lr."""
    for k, v in one["model"].items():
        if v.dim() == 2:
            torch.testing.assert_close(two["model"][k], v, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT on 1 process and on 2, from the same data and flags."""
    root = tmp_path_factory.mktemp("ddp")
    synth.write_synth(root / "data", seed=0, sizes=dict(train=480, valid=48, test=8, transfer=8))
    common = ["--task", "synth", "--data-dir", root / "data", "--cache-dir", root / "cache"]
    proc = run("sft.py", *common, "--out-dir", root / "sft1", *SFT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("sft.py", *common, "--out-dir", root / "sft2", *SFT, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, common, proc.stdout


@pytest.mark.slow
def test_sft_on_two_processes_matches_one_at_the_same_global_batch(runs):
    root, _, stdout = runs
    one, two = load_checkpoint(root / "sft1" / "sft.pt"), load_checkpoint(root / "sft2" / "sft.pt")
    assert one["step"] == two["step"] == 60
    assert_same_matrices(one, two)  # a lost or repeated shard would move them by ~lr = 3e-3 per step
    log1, log2 = ([json.loads(line) for line in (root / d / "sft.log.jsonl").read_text().splitlines()]
                  for d in ("sft1", "sft2"))
    assert [row["step"] for row in log2] == list(range(61))  # rank 0 alone writes the log
    assert len(log1) == len(log2)
    compared = 0
    for a, b in zip(log1, log2):
        assert a.keys() == b.keys(), a["step"]  # the same rows carry a loss and a validation loss
        # step 0 has no training loss, and the validation loss comes every --eval-every steps: rows without a number
        # are skipped here, on purpose
        for key in ("loss", "val_loss"):  # val_loss: each process a shard, summed
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
                compared += 1
    assert compared == 60 + 4  # every step's loss, and the validation loss at steps 0, 20, 40 and 60
    # the temperature-0 samples: each process summarizes its shard, rank 0 writes them all in order
    assert (root / "sft2" / "sft_samples.jsonl").read_text() == (root / "sft1" / "sft_samples.jsonl").read_text()
    assert stdout.count("step 60/60") == 1 and "x 2 processes" in stdout  # one copy of each line
    assert pt_files(root / "sft2") == ["sft.pt"]


@pytest.fixture(scope="module")
def reward_run(runs):
    root, common, _ = runs
    proc = run("reward.py", *common, "--sft", root / "sft2" / "sft.pt", "--out-dir", root / "rm2", *REWARD, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_reward_on_two_processes_writes_one_checkpoint_and_matches_one_process(runs, reward_run):
    root, common, _ = runs
    # rank 0 collected the comparisons alone: one file each, every line once
    train = (root / "rm2" / "comparisons" / "synth_train.json").read_text().splitlines()
    assert len(train) == 192 and len((root / "rm2" / "comparisons" / "synth_valid.json").read_text().splitlines()) == 32
    assert pt_files(root / "rm2") == ["reward.pt"]
    log = [json.loads(line) for line in (root / "rm2" / "reward.log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, load_checkpoint(root / "rm2" / "reward.pt")["step"] + 1))
    # one process on the same comparisons: the same weights, normalization and held-out accuracy
    (root / "rm1" / "comparisons").mkdir(parents=True)
    for f in ("synth_train.json", "synth_valid.json"):
        (root / "rm1" / "comparisons" / f).write_bytes((root / "rm2" / "comparisons" / f).read_bytes())
    proc = run("reward.py", *common, "--sft", root / "sft2" / "sft.pt", "--out-dir", root / "rm1", *REWARD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_checkpoint(root / "rm1" / "reward.pt"), load_checkpoint(root / "rm2" / "reward.pt")
    assert_same_matrices(one, two)
    m1, m2 = one["metrics"], two["metrics"]
    for k in ("reward_mean", "reward_std", "reference_reward_after"):  # held-out rewards after normalization
        assert m2[k] == pytest.approx(m1[k], abs=1e-5)
    acc1, acc2 = m1["accuracy"]["synth"]["overall"], m2["accuracy"]["synth"]["overall"]
    assert acc2["n"] == acc1["n"] >= 24 and abs(acc2["accuracy"] - acc1["accuracy"]) <= 1 / acc1["n"]


@pytest.mark.slow
def test_ppo_on_two_processes_stops_resumes_and_writes_one_checkpoint(runs, reward_run, tmp_path):
    root, common, _ = runs
    args = [*common, "--sft", root / "sft2" / "sft.pt", "--reward", root / "rm2" / "reward.pt", "--out-dir", tmp_path,
            *PPO]
    proc = run("ppo.py", *args, "--stop-after", "1", processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pt_files(tmp_path) == ["ppo.resume.pt"]
    proc = run("ppo.py", *args, "--resume", processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pt_files(tmp_path) == ["ppo.pt"]
    log = [json.loads(line) for line in (tmp_path / "ppo.log.jsonl").read_text().splitlines()]
    assert [row["update"] for row in log] == [0, 1, 2] and all("gold_win_rate" in row for row in log)
    for row in log[1:]:
        assert row["first_minibatch_ratio_dev"] == 0.0 and row["episodes"] == 32 * row["update"]
    assert load_checkpoint(tmp_path / "ppo.pt", stage="ppo")["step"] == 2
    # one process samples the same episodes (each from its own seed) and takes the same steps, up to float rounding
    proc = run("ppo.py", *[tmp_path / "one" if a == tmp_path else a for a in args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one" / "ppo.log.jsonl").read_text().splitlines()]
    for row_1, row_2 in zip(one[1:], log[1:]):
        for key in ("score", "kl", "length", "policy_loss", "value_loss", "entropy"):
            assert row_2[key] == pytest.approx(row_1[key], rel=1e-4, abs=1e-6), key
    w1 = load_checkpoint(tmp_path / "one" / "ppo.pt")["model"]
    w2 = load_checkpoint(tmp_path / "ppo.pt")["model"]
    assert w1.keys() == w2.keys() and max_difference_but_key_biases(w1, w2) < 1e-4


def flatten(tree, prefix=""):
    """{'a': {'b': 1}, 'c': [2]} -> {'a/b': 1, 'c/0': 2}"""
    if isinstance(tree, (dict, list)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}/{key}").items()}
    return {prefix: tree}


@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one(runs, reward_run):
    root, common, _ = runs
    args = [*common, "--sft", root / "sft2" / "sft.pt", "--reward", root / "rm2" / "reward.pt", "--policies",
            root / "sft1" / "sft.pt", "--n-posts", "8", "--batch-size", "3", "--max-n", "2", "--bon-posts", "5",
            "--comparisons", root / "rm2" / "comparisons" / "synth_valid.json", "--no-plots"]
    results = []
    for processes in (1, 2):  # 8 posts in 3 batches of 3: the processes get 1 and 2 batches (and 4 of 7 for BoN)
        proc = run("evaluate.py", *args, "--out-dir", root / f"eval{processes}", processes=processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads((root / f"eval{processes}" / "eval.json").read_text())
        results.append({k: v for k, v in res.items() if k not in ("args", "minutes")})
        assert proc.stdout.count("evaluate: wrote") == 1  # one process writes and reports
    one, two = flatten(results[0]), flatten(results[1])
    assert one.keys() == two.keys()
    for key, value in one.items():  # the same summaries, samples, KL and verdicts
        assert two[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key
    assert results[0]["policies"]["sft"]["kl"]["mean"] != 0.0  # sampled: sft1 is not the reference policy sft2
    assert (root / "eval2" / "eval_samples.md").read_text() == (root / "eval1" / "eval_samples.md").read_text()


@pytest.mark.slow
def test_batches_that_do_not_split_over_the_processes_are_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cases = [(sft, ["--batch-size", "16", "--micro-batch-size", "16"],
              "--batch-size 16 is not a multiple of --micro-batch-size 16 x 2 processes"),
             (reward, ["--batch-size", "30", "--micro-batch-size", "4"],
              "--batch-size 30 is not a multiple of --micro-batch-size 4 x 2 processes"),
             (ppo, ["--rollout-batch-size", "45", "--minibatch-size", "15", "--micro-batch-size", "5"],
              "--minibatch-size 15 is not a multiple of the 2 processes"),
             (ppo, ["--rollout-batch-size", "24", "--minibatch-size", "32", "--micro-batch-size", "8"],
              "--rollout-batch-size 24 is not a multiple of --micro-batch-size 8 x 2 processes")]
    for stage, flags, message in cases:
        with pytest.raises(SystemExit) as e:
            stage.parse_args(["--task", "synth", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    # the synth default micro-batch is each process's share of the batch
    assert sft.parse_args(["--task", "synth", "--batch-size", "64"]).micro_batch_size == 32
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # and through torchrun itself: every process refuses before any work
    proc = run("sft.py", "--task", "synth", "--out-dir", tmp_path, "--batch-size", "24", "--micro-batch-size", "8",
               processes=2)
    assert proc.returncode != 0  # torchrun itself then reports the failed processes (with its own traceback)
    assert "sft.py: error: --batch-size 24 is not a multiple of --micro-batch-size 8 x 2 processes" in proc.stderr


def test_more_processes_than_gpus_stop_with_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a machine with one GPU: every process stops with what to do, before it asks
    CUDA for a device that does not exist (which would die with "invalid device ordinal")."""
    from support import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) was reached"))
    for rank in ("0", "1"):
        for k, v in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ValueError, match=r"2 processes on this node but 1 GPU.*--nproc_per_node 1.*--device cpu"):
            distributed.setup("auto")
    # one process per GPU passes the check (it would then set its device and join the group)


def test_a_missing_gpu_or_a_bad_device_name_is_a_clear_error(monkeypatch):
    from support import cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is visible.*--device cpu"):
        cli.pick_device("cuda")
    with pytest.raises(ValueError, match="--device gpu0: not a device"):
        cli.pick_device("gpu0")
    assert cli.pick_device("auto").type == "cpu"
