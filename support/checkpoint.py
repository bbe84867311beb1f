"""
Checkpoints: plain dicts of tensors and Python values, written atomically and read with weights_only=True, so that
loading never runs code. Every stage writes one ({stage}.pt) and a resume state ({stage}.resume.pt); a later stage
takes its model shapes, tokenizer and task from the checkpoint it reads, and refuses a mismatch by name.
"""
import argparse
import pickle
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from model import GPT, GPTConfig
from support.files import atomic_open

FORMAT = "tldr-rlhf/1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, not ours, pickled code, or another stage, task or tokenizer."""


def plain(obj):
    """Args and metrics as values torch.load(weights_only=True) accepts: dicts, lists, str, numbers, bool, None."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def save_checkpoint(path, model, *, stage, task, tokenizer, args=None, step=0, metrics=None, **extra):
    """Write {format, stage, task, tokenizer, config, model, args, step, metrics, **extra} atomically (a run killed
    mid-save leaves the previous checkpoint intact). extra may hold tensors and state dicts (optimizer, RNG)."""
    ckpt = dict(format=FORMAT, stage=stage, task=task, tokenizer=tokenizer, config=asdict(model.config),
                model=model.state_dict(), args=plain(args or {}), step=step, metrics=plain(metrics or {}), **extra)
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path, stage=None, task=None, tokenizer=None, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint. stage (a name or a tuple of names), task and tokenizer are what
    the caller expects; anything else - a missing file, a file that is not a checkpoint, pickled code, another stage,
    task or tokenizer - is a CheckpointError that names the file and what was expected."""
    path = Path(path)
    want = (stage,) if isinstance(stage, str) else stage
    what = f"a {' or '.join(want)} checkpoint" if want else "a checkpoint"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected {what})")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save archive); expected {what}")
    with zipfile.ZipFile(path) as z:  # torch.load does not check the CRCs: a damaged tensor would load silently
        try:
            damaged = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            damaged = f"? ({e})"
    if damaged:
        raise CheckpointError(f"{path}: damaged after it was written ({damaged} fails its checksum); restore it or "
                              f"run the stage again")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "not plain data")
        raise CheckpointError(f"{path}: refused to load: it holds pickled objects or code, not plain tensors "
                              f"({why})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); expected {what}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tldr-rlhf checkpoint (expected {what})")
    if want and ckpt["stage"] not in want:
        raise CheckpointError(f"{path}: is a {ckpt['stage']} checkpoint, expected {what}")
    if (task and ckpt["task"] != task) or (tokenizer and ckpt["tokenizer"] != tokenizer):
        raise CheckpointError(f"{path}: a {ckpt['stage']} checkpoint of task {ckpt['task']} with tokenizer "
                              f"{ckpt['tokenizer']}, but --task {task or ckpt['task']} uses "
                              f"{tokenizer or ckpt['tokenizer']}")
    return ckpt


def save_resume_state(path, model, optimizer, *, stage, task, tokenizer, args, step, **extra):
    """What --resume needs besides the weights: the optimizer, the torch RNG and the step (plus a stage's extras)."""
    save_checkpoint(path, model, stage=stage, task=task, tokenizer=tokenizer, args=args, step=step,
                    optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), **extra)


# Flags that change how a run is carried out but not what it computes: a resume may change them. Any other
# difference (seed, learning rate, batch sizes, model shape, ...) would silently splice two different runs.
RESUMABLE_CHANGES = {"resume", "stop_after", "device", "dtype", "compile", "out_dir", "cache_dir", "data_dir",
                     "micro_batch_size", "sample_batch_size", "eval_every", "save_every", "eval_n", "sample_n", "sft",
                     "reward", "model", "comparisons", "collect"}


def load_resume_state(path, model, optimizer, stage, args=None):
    """Restore the weights, the optimizer and the torch RNG saved by save_resume_state; returns the checkpoint (its
    step and extras). args: the resuming run's flags, refused when they differ from the saved run's."""
    state = load_checkpoint(path, stage=stage)
    saved, now = state.get("args") or {}, plain(args or {})
    changed = [k for k in sorted(saved.keys() & now.keys()) if k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {now[k]} (saved: {saved[k]})" for k in changed)
        raise CheckpointError(f"{path}: cannot resume with other settings: {flags}. Resume with the saved ones, "
                              f"or start anew without --resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    print(f"{stage}: resumed at step {state['step']} from {path}")
    return state


def model_from_checkpoint(ckpt, head=None):
    """Rebuild the GPT of a checkpoint. head='scalar' on an LM checkpoint gives the reward model's starting point:
    the same trunk with a fresh scalar head (and the reverse is refused: a reward model is no policy)."""
    cfg = GPTConfig(**{f.name: ckpt["config"][f.name] for f in fields(GPTConfig) if f.name in ckpt["config"]})
    if head is not None and head != cfg.head:
        if cfg.head == "scalar":
            raise CheckpointError(f"a {ckpt['stage']} checkpoint has a scalar head and cannot become a policy")
        cfg.head = head
    model = GPT(cfg)
    state = ckpt["model"]
    if cfg.head != ckpt["config"]["head"]:
        state = {k: v for k, v in state.items() if k.startswith("transformer.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.head != ckpt["config"]["head"] and k.startswith("score."))]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt['stage']} checkpoint does not fit its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model


def stop_if_not_finite(loss, where, resume_path):
    """Raise FloatingPointError before a non-finite loss reaches the weights: the run stops and every file already
    written (the last resume state, earlier checkpoints) stays as it was. where: "step 12", "update 4"."""
    if torch.isfinite(torch.as_tensor(loss)).all():
        return
    kept = (f"the last resume state {resume_path} is kept (fix the cause, e.g. a lower --lr, then --resume)"
            if Path(resume_path).exists() else "no resume state had been written yet")
    raise FloatingPointError(f"{where}: the loss is {float(loss)}; stopping before it reaches the weights; {kept}")
