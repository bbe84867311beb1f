"""Faults: a stage killed (SIGKILL, as by the OOM killer or a pre-empted job) at chosen moments - mid-training, and
after its last resume save while it writes its final files - resumes with --resume to the weights of a run that was
never interrupted."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_at(marker, *args):
    """Start a stage and SIGKILL it as soon as its output (stdout and stderr, progress bars included) shows
    marker. Returns the output up to then."""
    proc = subprocess.Popen([sys.executable, "-u", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = []
    for line in proc.stdout:  # text mode splits progress bars at their "\r" too
        seen.append(line)
        if marker in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    output = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, f"{marker!r} never appeared:\n{output[-3000:]}"
    return output


def same_weights(a, b):
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_killed_mid_run_and_after_its_last_save_resumes_to_the_same_weights(stages, tmp_path):
    root, _ = stages
    args = ["sft.py", "--task", "synth", "--data-dir", root / "data", "--cache-dir", root / "cache", "--n-layer", "2",
            "--n-head", "2", "--n-embd", "32", "--batch-size", "32", "--epochs", "1", "--val-size", "32",
            "--sample-n", "16", "--save-every", "5", "--device", "cpu"]  # 30 steps
    run(*args, "--out-dir", tmp_path / "a")
    kill_at("step 12/30", *args, "--out-dir", tmp_path / "b")  # between two saves (10 and 15)
    assert load_checkpoint(tmp_path / "b" / "sft.resume.pt")["step"] in (10, 15)
    # resumed, then killed again while it summarizes the validation posts: after the final step's save
    kill_at("sft: summarizing validation posts", *args, "--out-dir", tmp_path / "b", "--resume")
    assert load_checkpoint(tmp_path / "b" / "sft.resume.pt")["step"] == 30 and not (tmp_path / "b" / "sft.pt").exists()
    run(*args, "--out-dir", tmp_path / "b", "--resume")
    assert same_weights(tmp_path / "a" / "sft.pt", tmp_path / "b" / "sft.pt")
    steps = [line for line in (tmp_path / "b" / "sft.log.jsonl").read_text().splitlines()]
    assert len(steps) == 31  # steps 0..30, none twice after the resumes
    assert not (tmp_path / "b" / "sft.resume.pt").exists()


def test_ppo_killed_mid_run_and_after_its_last_save_resumes_to_the_same_weights(stages, tmp_path):
    root, _ = stages
    args = ["ppo.py", "--task", "synth", "--data-dir", root / "data", "--cache-dir", root / "cache", "--sft",
            root / "out" / "sft.pt", "--reward", root / "out" / "reward.pt", "--episodes", "192",
            "--rollout-batch-size", "32", "--minibatch-size", "16", "--micro-batch-size", "8", "--lr", "1e-4",
            "--eval-every", "3", "--eval-n", "16", "--save-every", "2", "--device", "cpu"]  # 6 updates
    run(*args, "--out-dir", tmp_path / "a")
    kill_at("update 3/6", *args, "--out-dir", tmp_path / "b")
    kill_at("ppo: final validation summaries", *args, "--out-dir", tmp_path / "b", "--resume")
    assert load_checkpoint(tmp_path / "b" / "ppo.resume.pt")["step"] == 6 and not (tmp_path / "b" / "ppo.pt").exists()
    run(*args, "--out-dir", tmp_path / "b", "--resume")
    assert same_weights(tmp_path / "a" / "ppo.pt", tmp_path / "b" / "ppo.pt")
    updates = [line for line in (tmp_path / "b" / "ppo.log.jsonl").read_text().splitlines()]
    assert len(updates) == 7
