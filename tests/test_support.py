"""support/: the Hugging Face layout in and out, checkpoint files, the atomic writer."""
import argparse
import errno
import os
import time
import zipfile

import pytest
import torch

from support import hf
from support.checkpoint import (CheckpointError, load_checkpoint, load_resume_state, model_from_checkpoint,
                                save_checkpoint, save_resume_state)
from support.files import atomic_open
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
    save_checkpoint(tmp_path / "sft.pt", tiny_model(), stage="sft", task="synth", tokenizer="synth-words-v1")
    assert load_checkpoint(tmp_path / "sft.pt", stage="sft", task="synth", tokenizer="synth-words-v1")["step"] == 0
    with pytest.raises(CheckpointError, match="sft.pt: a sft checkpoint of task synth with tokenizer synth-words-v1, "
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
                      args=saved, step=7)
    other = argparse.Namespace(**{**vars(saved), "micro_batch_size": 4, "device": "cuda"})  # how, not what: allowed
    assert load_resume_state(tmp_path / "sft.resume.pt", model, optimizer, "sft", other)["step"] == 7
    other = argparse.Namespace(**{**vars(saved), "seed": 1, "lr": 2e-3})
    with pytest.raises(CheckpointError, match="cannot resume with other settings: --lr 0.002 \\(saved: 0.001\\), "
                                              "--seed 1 \\(saved: 0\\)"):
        load_resume_state(tmp_path / "sft.resume.pt", model, optimizer, "sft", other)
