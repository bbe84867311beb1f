"""support/: the Hugging Face layout in and out, checkpoint files, the atomic writer."""
import argparse
import builtins
import errno
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch

from support import hf
from support.checkpoint import (CheckpointError, check_resume, input_digests, load_checkpoint, load_resume_state,
                                model_from_checkpoint, save_checkpoint, save_resume_state)
from support.files import atomic_open
from support.steplog import StepLog
from test_model import left_pad, tiny_model


# --- Hugging Face layout: safetensors, export, loading errors ---

def test_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16()}
    hf.write_safetensors(tmp_path / "x.safetensors", tensors)
    raw = (tmp_path / "x.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0  # data starts aligned
    back = hf.read_safetensors(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])


def test_export_then_from_pretrained_gives_identical_logits(tmp_path):
    model = tiny_model(seed=3)
    hf.export(model, tmp_path / "hf")
    back = hf.from_pretrained(tmp_path / "hf").eval()
    ids, mask = left_pad([[1, 2, 3, 4, 5], [6, 7]], 5)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), back(ids, mask))
    keys = hf.read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert keys["transformer.wte.weight"].shape == (1000, 64)  # vocabulary rows cut back to the real ones
    assert keys["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D layout: (in, out)


def test_from_pretrained_names_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        hf.from_pretrained("gpt3")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.from_pretrained(tmp_path / "bad")
    hf.export(tiny_model(), tmp_path / "cut")
    tensors = hf.read_safetensors(tmp_path / "cut" / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    hf.write_safetensors(tmp_path / "cut" / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        hf.from_pretrained(tmp_path / "cut")


def test_download_without_network_fails_fast_and_says_where_files_go(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_RLHF_CACHE", str(tmp_path))
    monkeypatch.setenv("TLDR_RLHF_HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.time()
    with pytest.raises(ConnectionError) as err:
        hf.from_pretrained("gpt2")
    assert time.time() - start < 15
    assert str(tmp_path / "gpt2") in str(err.value) and "config.json" in str(err.value)


# --- checkpoints ---

def test_checkpoint_round_trip_with_metadata(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "sft.pt", model, stage="sft", task="synth", tokenizer="synth-words",
                    args={"lr": 1e-3, "out_dir": tmp_path}, step=7, metrics={"loss": 1.5})
    assert not list(tmp_path.glob("*.tmp"))
    ckpt = load_checkpoint(tmp_path / "sft.pt", stage="sft")
    assert (ckpt["stage"], ckpt["task"], ckpt["tokenizer"], ckpt["step"]) == ("sft", "synth", "synth-words", 7)
    assert ckpt["args"]["out_dir"] == str(tmp_path) and ckpt["metrics"] == {"loss": 1.5}
    back = model_from_checkpoint(ckpt).eval()
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
        rm = model_from_checkpoint(ckpt, head="scalar")
        assert torch.equal(rm.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)
        assert rm(ids).shape == (2, 8)


def test_checkpoint_errors_name_the_file_and_the_expectation(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file \(expected a sft checkpoint\)"):
        load_checkpoint(tmp_path / "nope.pt", stage="sft")
    save_checkpoint(tmp_path / "reward.pt", tiny_model(head="scalar"), stage="reward", task="synth", tokenizer="t")
    with pytest.raises(CheckpointError, match="is a reward checkpoint, expected a sft or ppo checkpoint"):
        load_checkpoint(tmp_path / "reward.pt", stage=("sft", "ppo"))
    with pytest.raises(CheckpointError, match="cannot become a policy"):
        model_from_checkpoint(load_checkpoint(tmp_path / "reward.pt"), head="lm")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: not a tldr-rlhf checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


class Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    torch.save({"format": "tldr-rlhf/1", "stage": "sft", "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_checkpoint_of_another_task_or_tokenizer_is_refused_by_name(tmp_path):
    save_checkpoint(tmp_path / "sft.pt", tiny_model(), stage="sft", task="synth", tokenizer="synth-words-v2")
    assert load_checkpoint(tmp_path / "sft.pt", stage="sft", task="synth", tokenizer="synth-words-v2")["step"] == 0
    with pytest.raises(CheckpointError, match="sft.pt: a sft checkpoint of task synth with tokenizer synth-words-v2, "
                                              "but --task tldr uses gpt2"):
        load_checkpoint(tmp_path / "sft.pt", stage="sft", task="tldr", tokenizer="gpt2")
    with pytest.raises(CheckpointError, match="but --task synth uses gpt2"):
        load_checkpoint(tmp_path / "sft.pt", tokenizer="gpt2")


def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    with atomic_open(path) as f:
        f.write("first\n")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half of the second")
            raise RuntimeError("killed")
    assert path.read_text() == "first\n" and sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "sft.pt"
    save_checkpoint(path, tiny_model(), stage="sft", task="synth", tokenizer="x")
    before = path.read_bytes()

    def no_space(fd):  # the disk fills while the new checkpoint is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=f"could not write {path} .*No space left on device.*the previous file is intact"):
        save_checkpoint(path, tiny_model(seed=1), stage="sft", task="synth", tokenizer="x")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["sft.pt"]


def test_a_checkpoint_damaged_on_disk_is_refused(tmp_path):
    # 64 flipped bytes inside a tensor's record: torch.load would read them as numbers; the zip's CRC catches them
    path = tmp_path / "sft.pt"
    save_checkpoint(path, tiny_model(), stage="sft", task="synth", tokenizer="x")
    with zipfile.ZipFile(path) as z:
        record = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 1000)
    raw = bytearray(path.read_bytes())
    start = record.header_offset + 30 + len(record.filename) + 100  # inside the stored (uncompressed) bytes
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{path}: damaged after it was written .* fails its checksum"):
        load_checkpoint(path)


def test_a_resume_with_other_settings_is_refused_by_flag(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    saved = argparse.Namespace(seed=0, lr=1e-3, n_layer=2, micro_batch_size=8, device="cpu")
    save_resume_state(tmp_path / "sft.resume.pt", model, optimizer, stage="sft", task="synth", tokenizer="x",
                      args=saved, step=7, inputs={})
    other = argparse.Namespace(**{**vars(saved), "micro_batch_size": 4, "device": "cuda"})  # how, not what: allowed
    assert load_resume_state(tmp_path / "sft.resume.pt", model, optimizer, "sft", other, {})["step"] == 7
    other = argparse.Namespace(**{**vars(saved), "seed": 1, "lr": 2e-3})
    with pytest.raises(CheckpointError, match="cannot resume with other settings: --lr 0.002 \\(saved: 0.001\\), "
                                              "--seed 1 \\(saved: 0\\)"):
        load_resume_state(tmp_path / "sft.resume.pt", model, optimizer, "sft", other, {})


def test_a_resume_on_other_input_files_is_refused_by_name(tmp_path):
    """A resume reads its inputs' digests, not their names: the same bytes under another path resume; other bytes
    under the same path (a retrained sft.pt), a missing input or another model's weights are refused by name."""
    model, args = tiny_model(), argparse.Namespace(seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    sft_pt, moved, posts = tmp_path / "sft.pt", tmp_path / "moved.pt", tmp_path / "train.jsonl"
    sft_pt.write_bytes(b"weights")
    moved.write_bytes(b"weights")
    posts.write_text("{}\n")
    state = tmp_path / "x.resume.pt"
    save_resume_state(state, model, optimizer, stage="sft", task="synth", tokenizer="x", args=args, step=3,
                      inputs=input_digests({"--sft": sft_pt, "train data": posts, "--model": "gpt2"}))
    same = input_digests({"--sft": moved, "train data": posts, "--model": "gpt2"})
    assert load_resume_state(state, model, optimizer, "sft", args, same)["step"] == 3
    sft_pt.write_bytes(b"weights of another run")
    with pytest.raises(CheckpointError, match=f"--sft {sft_pt} is not the file it started with \\({sft_pt}\\)"):
        load_resume_state(state, model, optimizer, "sft", args,
                          input_digests({"--sft": sft_pt, "train data": posts, "--model": "gpt2"}))
    with pytest.raises(CheckpointError, match="--model gpt2-medium is not the file it started with"):
        load_resume_state(state, model, optimizer, "sft", args,
                          input_digests({"--sft": moved, "train data": posts, "--model": "gpt2-medium"}))
    with pytest.raises(CheckpointError, match="train data None is not the file"):
        load_resume_state(state, model, optimizer, "sft", args, input_digests({"--sft": moved, "--model": "gpt2"}))
    # partial: an early check of the inputs at hand passes, and still catches a changed one
    check_resume(state, "sft", args, input_digests({"--sft": moved}), partial=True)
    with pytest.raises(CheckpointError, match="--sft"):
        check_resume(state, "sft", args, input_digests({"--sft": sft_pt}), partial=True)
    bigger = tiny_model(n_embd=2 * model.config.n_embd)
    with pytest.raises(CheckpointError, match="the saved weights do not fit this run's model"):
        load_resume_state(state, bigger, torch.optim.AdamW(bigger.parameters()), "sft", args, same)


# --- numeric flags: a value that would run to the end and mean nothing is an argparse error naming the flag ---

def parse_stage(script, argv, tmp_path, monkeypatch):
    """Parse a stage script's flags in-process, as its command line would; synth.py parses in main (sys.argv)."""
    import importlib
    module = importlib.import_module(script)
    base = {"label": ["--out", str(tmp_path / "labels.jsonl")],
            "evaluate": ["--task", "synth", "--out-dir", str(tmp_path), "--policies", str(tmp_path / "x.pt")],
            "synth": ["--out-dir", str(tmp_path / "data"), "--n-train", "8", "--n-valid", "4", "--n-test", "2",
                      "--n-transfer", "2"]}.get(script, ["--task", "synth", "--out-dir", str(tmp_path)])
    if script == "synth":  # the subcommand's flags come after it
        cut = argv.index("collect") if "collect" in argv else len(argv)
        monkeypatch.setattr("sys.argv", ["synth.py", *base, *argv[:cut], *argv[cut:]])
        return module.main()
    return module.parse_args(base + argv)


BAD_FLAGS = [  # (script, flags, what the error says); each ran to exit 0, or failed only after work had started
    ("sft", ["--lr", "0"], "argument --lr: must be more than 0, got 0"),
    ("sft", ["--lr", "-1"], "argument --lr: must be more than 0, got -1"),
    ("sft", ["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    ("sft", ["--warmup", "2"], "argument --warmup: must be at least 0 and less than 1, got 2"),
    ("sft", ["--epochs", "0"], "argument --epochs: must be more than 0, got 0"),
    ("sft", ["--weight-decay", "-0.1"], "argument --weight-decay: must be at least 0, got -0.1"),
    ("sft", ["--grad-clip", "-1"], "argument --grad-clip: must be at least 0, got -1"),
    ("sft", ["--sample-n", "-5"], "argument --sample-n: must be at least 1, got -5"),
    ("sft", ["--stop-after", "0"], "argument --stop-after: must be at least 1, got 0"),
    ("sft", ["--n-embd", "130", "--n-head", "4"], "--n-embd 130 is not a multiple of --n-head 4"),
    ("sft", ["--seed", "-1"], "argument --seed: must be between 0 and 4294967295, got -1"),
    ("sft", ["--seed", str(10**23)], f"argument --seed: must be between 0 and 4294967295, got {10**23}"),
    ("reward", ["--lr", "0"], "argument --lr: must be more than 0"),
    ("reward", ["--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
    ("reward", ["--ref-fraction", "1.5"], "argument --ref-fraction: must be between 0 and 1, got 1.5"),
    ("reward", ["--warmup", "-0.5"], "argument --warmup: must be at least 0 and less than 1"),
    ("reward", ["--epochs", "-1"], "argument --epochs: must be more than 0"),
    ("reward", ["--seed", "-1"], "argument --seed: must be between 0 and 4294967295"),
    ("ppo", ["--lr", "0"], "argument --lr: must be more than 0"),
    ("ppo", ["--temperature", "0"], "argument --temperature: must be more than 0, got 0"),
    ("ppo", ["--temperature", "-0.7"], "argument --temperature: must be more than 0"),
    ("ppo", ["--beta", "-1"], "argument --beta: must be at least 0, got -1"),
    ("ppo", ["--clip", "-1"], "argument --clip: must be more than 0, got -1"),
    ("ppo", ["--clip-value", "0"], "argument --clip-value: must be more than 0, got 0"),
    ("ppo", ["--target-kl", "-1"], "argument --target-kl: must be more than 0, got -1"),
    ("ppo", ["--target-kl", "0"], "argument --target-kl: must be more than 0, got 0"),  # was: silently off
    ("ppo", ["--gamma", "1.5"], "argument --gamma: must be between 0 and 1, got 1.5"),
    ("ppo", ["--lam", "-0.1"], "argument --lam: must be between 0 and 1, got -0.1"),
    ("ppo", ["--vf-coef", "-1"], "argument --vf-coef: must be at least 0"),
    ("ppo", ["--grad-clip", "-1"], "argument --grad-clip: must be at least 0"),
    ("ppo", ["--no-eos-score", "nan"], "argument --no-eos-score: must be a finite number, got nan"),
    ("ppo", ["--seed", "-1"], "argument --seed: must be between 0 and 4294967295"),
    ("ppo", ["--episodes", "47", "--rollout-batch-size", "16", "--minibatch-size", "16"],
     "--episodes 47 is not a multiple of --rollout-batch-size 16"),
    ("evaluate", ["--kl-temperature", "0"], "argument --kl-temperature: must be more than 0, got 0"),
    ("evaluate", ["--bon-temperature", "-1"], "argument --bon-temperature: must be at least 0"),
    ("evaluate", ["--max-n", "-1"], "argument --max-n: must be at least 0, got -1"),
    ("evaluate", ["--analysis-n", "-1"], "argument --analysis-n: must be at least 0"),
    ("evaluate", ["--show", "-1"], "argument --show: must be at least 0"),
    ("evaluate", ["--seed", "-1"], "argument --seed: must be between 0 and 4294967295"),
    ("evaluate", ["--judge-workers", "0"], "argument --judge-workers: must be at least 1, got 0"),
    ("evaluate", ["--judge-retries", "-1"], "argument --judge-retries: must be at least 0"),
    ("evaluate", ["--judge-budget", "0"], "argument --judge-budget: must be at least 1"),
    ("evaluate", ["--judge-timeout", "0"], "argument --judge-timeout: must be more than 0"),
    ("label", ["--temperature", "-1"], "argument --temperature: must be at least 0"),
    ("label", ["--seed", "-1"], "argument --seed: must be between 0 and 4294967295"),
    ("label", ["--port", "70000"], "argument --port: must be between 0 and 65535, got 70000"),
    ("synth", ["--seed", "-1"], "argument --seed: must be between 0 and 4294967295"),
    ("synth", ["--n-train", "0"], "argument --n-train: must be at least 1, got 0"),
    ("synth", ["--n-test", "-1"], "argument --n-test: must be at least 0, got -1"),
    ("synth", ["--labelers", "0"], "argument --labelers: must be at least 1, got 0"),
    ("synth", ["collect", "x.pt", "--out", "c.json", "--temperature", "-1"], "argument --temperature: must be at "
     "least 0"),
    ("synth", ["collect", "x.pt", "--out", "c.json", "--ref-fraction", "2"], "argument --ref-fraction: must be "
     "between 0 and 1"),
    ("synth", ["collect", "x.pt", "--out", "c.json", "--n-posts", "0"], "argument --n-posts: must be at least 1"),
]


@pytest.mark.parametrize("script, flags, message", BAD_FLAGS, ids=[f"{s} {' '.join(f)}" for s, f, _ in BAD_FLAGS])
def test_a_meaningless_number_is_refused_naming_its_flag(script, flags, message, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        parse_stage(script, flags, tmp_path, monkeypatch)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.mark.parametrize("script, flags, key, value", [
    # the edges of each range are values with a meaning, and stay allowed
    ("sft", ["--warmup", "0", "--grad-clip", "0", "--weight-decay", "0", "--seed", "4294967295"], "seed", 2**32 - 1),
    ("ppo", ["--beta", "0", "--gamma", "0", "--lam", "1", "--vf-coef", "0", "--no-eos-score", "-5"], "beta", 0.0),
    ("evaluate", ["--bon-temperature", "0", "--max-n", "0", "--analysis-n", "0", "--show", "0"], "bon_temperature",
     0.0),
    ("label", ["--temperature", "0", "--ref-fraction", "1", "--port", "0"], "temperature", 0.0),
    # a task's default number of episodes is rounded down to whole rollout batches, as --episodes' help says
    ("ppo", ["--task", "tldr"], "episodes", 1953 * 512),
    ("ppo", ["--rollout-batch-size", "48"], "episodes", 66 * 48),
    ("ppo", ["--episodes", "96", "--rollout-batch-size", "48"], "episodes", 96),
    # the KL coefficient is the task's: tldr keeps the paper's 0.05, synth's is 0.1; a given 0 stays 0 (above)
    ("ppo", ["--task", "tldr"], "beta", 0.05),
    ("ppo", [], "beta", 0.1),
])
def test_the_edges_of_each_range_are_accepted(script, flags, key, value, tmp_path, monkeypatch):
    assert getattr(parse_stage(script, flags, tmp_path, monkeypatch), key) == value


# --- files that cannot be read or written, a torn step log: one line naming the file and the cause ---

def unreadable(monkeypatch, path):
    """Take the read permission from path. Root reads through any mode bits (CI runs as root), so there open()
    raises for path what the OS raises for anyone else: PermissionError(EACCES) naming the file."""
    path.chmod(0)
    try:
        path.open("rb").close()
    except PermissionError:
        return  # not root: the real refusal
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(path.absolute()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing_open)


def unwritable(monkeypatch, folder, code=errno.EACCES):
    """Make nothing creatable inside folder, as a read-only folder (EACCES) or file system (EROFS) does. chmod where
    that stops this process (not root, and EACCES only); otherwise open() for writing and mkdir() raise what the OS
    would."""
    folder.mkdir(parents=True, exist_ok=True)
    if code == errno.EACCES:
        folder.chmod(0o555)
        try:
            (folder / ".probe").touch()
        except PermissionError:
            return
        (folder / ".probe").unlink()
    real_open, real_mkdir = builtins.open, os.mkdir

    def inside(file):
        return isinstance(file, (str, os.PathLike)) and Path(os.path.abspath(file)).parent == folder.absolute()

    def refusing_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    def refusing_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(os, "mkdir", refusing_mkdir)


def test_an_unreadable_checkpoint_is_called_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "sft.pt"
    save_checkpoint(path, tiny_model(), stage="sft", task="synth", tokenizer="x")
    unreadable(monkeypatch, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, stage="sft")
    assert str(e.value) == f"{path}: cannot be read (Permission denied); expected a sft checkpoint"  # not "no archive"
    with pytest.raises(CheckpointError, match="a folder, not a file"):
        load_checkpoint(tmp_path, stage="sft")


@pytest.mark.parametrize("code, cause", [(errno.EACCES, "Permission denied: {folder} is not writable"),
                                         (errno.EROFS, "Read-only file system: {folder} cannot be written")])
def test_a_folder_that_cannot_be_written_is_no_full_disk(tmp_path, monkeypatch, code, cause):
    folder = tmp_path / "out"
    unwritable(monkeypatch, folder, code)
    for path, where in ((folder / "sft.json", folder), (folder / "new" / "sft.json", folder)):  # a file; a subfolder
        with pytest.raises(OSError) as e:
            with atomic_open(path) as f:
                f.write("{}\n")
        assert str(e.value) == f"could not write {path} ({cause.format(folder=where)}); no earlier file existed"
    assert os.listdir(folder) == []


def run_script(script, argv, monkeypatch):
    """A stage's command line, in this process (so monkeypatched files apply): its one-line error, or None."""
    import runpy
    monkeypatch.setattr("sys.argv", [f"{script}.py", *argv])
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / f"{script}.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


@pytest.mark.parametrize("script", ["sft", "reward", "ppo", "evaluate"])
def test_a_stage_whose_out_dir_cannot_be_made_says_so_in_one_line(script, tmp_path, monkeypatch):
    unwritable(monkeypatch, tmp_path / "ro")
    out = tmp_path / "ro" / "out"
    argv = ["--task", "synth", "--out-dir", str(out), "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    message = run_script(script, argv + (["--policies", str(out / "sft.pt")] if script == "evaluate" else []),
                         monkeypatch)
    assert isinstance(message, str) and message.startswith(f"{script}.py: error: ") and "\n" not in message
    assert "Permission denied" in message and str(out) in message


def test_a_read_only_cache_dir_stops_sft_with_one_line_not_a_full_disk(tmp_path, monkeypatch):
    import synth
    synth.write_synth(tmp_path / "data", sizes=dict(train=32, valid=16, test=1, transfer=1), n_labelers=2)
    unwritable(monkeypatch, tmp_path / "cache")
    message = run_script("sft", ["--task", "synth", "--data-dir", str(tmp_path / "data"), "--out-dir",
                                 str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
                         monkeypatch)
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"sft.py: error: could not write {tmp_path / 'cache'}/sft-")
    assert f"(Permission denied: {tmp_path / 'cache'} is not writable)" in message and "disk" not in message


def test_a_torn_last_step_log_line_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "sft.log.jsonl"
    rows = [json.dumps(dict(step=s, loss=1.0 / s)) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + '\n{"step": 5, "loss": 0.1')  # killed while writing step 5
    log = StepLog(path, resume_step=3)
    log.write(dict(step=4, loss=0.25))
    log.close()
    assert path.read_text() == "\n".join(rows[:3]) + '\n{"step": 4, "loss": 0.25}\n'
    assert f"{path}: dropped its torn last line" in capsys.readouterr().out


def test_a_damaged_step_log_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "ppo.log.jsonl"
    path.write_text('{"update": 1}\n{"update": 2, "kl\n{"update": 3}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: a damaged step-log row \\(not JSON"):
        StepLog(path, resume_step=3, key="update")
    path.write_text('{"update": 1}\n{"kl": 0.5}\n')  # whole, but not a row: no tear, so not dropped
    with pytest.raises(ValueError, match=f"^{path}:2: a damaged step-log row \\(no 'update' number\\)"):
        StepLog(path, resume_step=3, key="update")


def test_a_checkpoint_with_a_non_finite_weight_or_metric_is_not_written_and_the_previous_one_stays(tmp_path):
    model, path = tiny_model(), tmp_path / "sft.pt"
    save_checkpoint(path, model, stage="sft", task="synth", tokenizer="x", metrics=dict(val_loss=1.5))
    before = path.read_bytes()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="sft.pt: not written: model.transformer.h.0.attn.c_attn.weight is "
                                                 "not finite"):
        save_checkpoint(path, model, stage="sft", task="synth", tokenizer="x")
    with pytest.raises(FloatingPointError, match="not written: metrics.accuracy.valid2 is not finite"):
        save_checkpoint(path, tiny_model(), stage="sft", task="synth", tokenizer="x",
                        metrics=dict(accuracy=dict(valid2=float("nan"))))
    with pytest.raises(FloatingPointError, match="not written: norm_bias is not finite"):
        save_checkpoint(path, tiny_model(), stage="sft", task="synth", tokenizer="x", norm_bias=float("nan"))
    assert path.read_bytes() == before and not (tmp_path / "sft.pt.tmp").exists()
