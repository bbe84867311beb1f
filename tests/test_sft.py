"""sft.py: the loss mask, a short synthetic run, resume, the checkpoint, and clear errors on bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import data  # noqa: E402
import sft  # noqa: E402
import synth  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from support.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from support.files import run_lock  # noqa: E402

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "16", "--micro-batch-size", "8",
        "--lr", "3e-3", "--val-size", "32", "--sample-n", "16"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synth.write_synth(d, seed=0, sizes=dict(train=320, valid=32, test=16, transfer=8))
    return d


def run_sft(synth_dir, out, *extra):
    sft.main(["--task", "synth", "--data-dir", str(synth_dir), "--out-dir", str(out), "--cache-dir",
              str(out / "cache"), *TINY, *extra])
    return [json.loads(line) for line in (out / "sft.log.jsonl").read_text().splitlines()]


def test_loss_covers_exactly_the_summary_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    pad = 50
    query = torch.tensor([[pad, pad, 3, 4, 5], [6, 7, 8, 9, 10]])
    response = torch.tensor([[11, 12, 49, pad], [13, 49, pad, pad]])  # 49 plays EOS
    loss, n = sft.sft_loss(model, query, response, pad, "summary")
    assert n.item() == 5  # 3 + 2 response tokens, EOS included, PAD excluded
    # The same sum by hand: -log p(token | everything before it), for each real response token.
    want = 0.0
    for q, r in zip(query, response):
        seq = torch.cat([q[q != pad], r[r != pad]])[None]
        logp = model(seq).log_softmax(-1)[0]
        nq = int((q != pad).sum())
        want -= sum(logp[t - 1, seq[0, t]] for t in range(nq, seq.size(1)))
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)
    _, n_all = sft.sft_loss(model, query, response, pad, "all")
    assert n_all.item() == (3 - 1) + 3 + (5 - 1) + 2  # every real token but each row's first


@pytest.mark.slow
def test_short_run_lowers_validation_loss_and_writes_a_loadable_checkpoint(synth_dir, tmp_path):
    log = run_sft(synth_dir, tmp_path, "--epochs", "3", "--eval-every", "20")
    val = [row["val_loss"] for row in log if "val_loss" in row]
    assert log[0]["step"] == 0 and abs(val[0] - math.log(1101)) < 1.0  # a fresh model: about uniform
    assert val[-1] < val[0] - 2.0, val
    assert all({"loss", "lr", "tokens_per_s", "elapsed"} <= row.keys() for row in log[1:])
    ckpt = load_checkpoint(tmp_path / "sft.pt", stage="sft")
    assert (ckpt["stage"], ckpt["task"], ckpt["tokenizer"]) == ("sft", "synth", data.SYNTH_TOKENIZER)
    assert ckpt["config"]["vocab_size"] == data.get_tokenizer(data.SYNTH_TOKENIZER).n_vocab
    assert ckpt["config"]["n_embd"] == 32 and ckpt["args"]["lr"] == 3e-3 and ckpt["step"] == log[-1]["step"]
    metrics = json.loads((tmp_path / "sft.json").read_text())
    assert metrics == pytest.approx(ckpt["metrics"])
    for key in ("rouge1", "rouge2", "rougeL", "mean_length", "gold_win_rate_vs_ref", "val_loss"):
        assert key in metrics
    assert len((tmp_path / "sft_samples.jsonl").read_text().splitlines()) == 16
    assert not (tmp_path / "sft.resume.pt").exists()


@pytest.mark.slow
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(synth_dir, tmp_path):
    run_sft(synth_dir, tmp_path / "a", "--epochs", "1", "--save-every", "100")
    run_sft(synth_dir, tmp_path / "b", "--epochs", "1", "--save-every", "100", "--stop-after", "7")
    assert not (tmp_path / "b" / "sft.pt").exists() and (tmp_path / "b" / "sft.resume.pt").exists()
    log = run_sft(synth_dir, tmp_path / "b", "--epochs", "1", "--save-every", "100", "--resume")
    assert [row["step"] for row in log] == list(range(0, 21))  # 0..7 before the stop, 8..20 after: no gaps
    a = load_checkpoint(tmp_path / "a" / "sft.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "sft.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_nan_loss_stops_before_the_weights_and_keeps_the_resume_state(synth_dir, tmp_path, monkeypatch):
    real, calls = sft.train_step, {"n": 0}

    def nan_at_step_5(*args):
        calls["n"] += 1
        loss, tokens = real(*args)
        return (float("nan") if calls["n"] == 5 else loss), tokens

    monkeypatch.setattr(sft, "train_step", nan_at_step_5)
    with pytest.raises(FloatingPointError, match="step 5: the loss is nan; stopping before it reaches the weights; "
                                                 "the last resume state .* is kept"):
        run_sft(synth_dir, tmp_path, "--epochs", "1", "--save-every", "4")
    assert not (tmp_path / "sft.pt").exists()
    state = load_checkpoint(tmp_path / "sft.resume.pt", stage="sft")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "sft.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TLDR_RLHF_HF_ENDPOINT": "http://127.0.0.1:9"})


@pytest.mark.slow
def test_bad_input_gets_a_clear_message_and_no_traceback(synth_dir, tmp_path):
    proc = run_cli("--task", "synth", "--batch-size", "64", "--micro-batch-size", "24")
    assert proc.returncode == 2 and "--batch-size 64 is not a multiple of --micro-batch-size 24" in proc.stderr
    proc = run_cli("--task", "tldr", "--data-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 1 and "train.jsonl not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--task", "synth", "--data-dir", str(synth_dir), "--out-dir", str(tmp_path), "--model", "gpt5")
    assert "unknown model 'gpt5'" in proc.stderr and "Traceback" not in proc.stderr
    rm = GPT(GPTConfig(vocab_size=1101, block_size=128, n_layer=1, n_head=2, n_embd=16, head="scalar"))
    save_checkpoint(tmp_path / "reward.pt", rm, stage="reward", task="synth", tokenizer=data.SYNTH_TOKENIZER)
    proc = run_cli("--task", "synth", "--data-dir", str(synth_dir), "--out-dir", str(tmp_path), "--cache-dir",
                   str(tmp_path / "cache"), "--model", str(tmp_path / "reward.pt"))
    assert "is a reward checkpoint, expected a sft checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(CheckpointError, match="sft.resume.pt: no such file"):
        run_sft(synth_dir, tmp_path / "fresh", "--resume")
    proc = run_cli("--task", "synth", "--batch-size", "0")
    assert proc.returncode == 2 and "argument --batch-size: must be at least 1, got 0" in proc.stderr
    (tmp_path / "a-file").write_text("")
    proc = run_cli("--task", "synth", "--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "a-file" / "out"))
    assert proc.returncode == 1 and "a-file is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "valid"):
        (empty / f"{split}.jsonl").write_text("" if split == "valid" else (synth_dir / "train.jsonl").read_text())
    proc = run_cli("--task", "synth", "--data-dir", str(empty), "--out-dir", str(tmp_path / "o"), "--cache-dir",
                   str(tmp_path / "cache"))
    assert proc.returncode == 1 and "valid.jsonl holds no records" in proc.stderr and "Traceback" not in proc.stderr


def test_a_second_run_in_the_same_out_dir_is_refused_naming_the_first(synth_dir, tmp_path):
    """Two runs in one --out-dir would leave one run's sft.pt beside the other's sft.json and log; the second is
    refused before it writes anything, across processes and within one."""
    out = tmp_path / "out"
    with run_lock(out, "sft"):  # a first run holds the out-dir
        proc = run_cli("--task", "synth", "--data-dir", str(synth_dir), "--out-dir", str(out), "--cache-dir",
                       str(tmp_path / "cache"), *TINY)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"sft.py: error: another sft.py (pid {os.getpid()}) is running in {out}" in proc.stderr
        with pytest.raises(SystemExit, match=f"another sft.py \\(pid {os.getpid()}\\)"):
            run_sft(synth_dir, out)
        assert sorted(p.name for p in out.iterdir()) == ["sft.lock"]
    with run_lock(out, "reward"), run_lock(out, "sft"):  # the first run ended; another stage's lock is its own
        assert (out / "sft.lock").read_text() == f"{os.getpid()}\n"


def test_a_run_that_diverges_on_its_last_step_writes_no_final_files(synth_dir, tmp_path):
    """--lr 1e6 and one step: the step's loss is finite (checked), the weights it leaves are not usable (the final
    validation loss is NaN). Nothing final is written, and the advice is not --resume, which would repeat the step."""
    with pytest.raises(FloatingPointError, match="sft.pt: not written: val_loss is not finite .* not with --resume"):
        run_sft(synth_dir, tmp_path, "--lr", "1e6", "--epochs", "0.05")
    assert not {"sft.pt", "sft.json", "sft_samples.jsonl", "sft.resume.pt"} & {p.name for p in tmp_path.iterdir()}
