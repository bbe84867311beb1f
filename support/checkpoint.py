"""
Checkpoints: plain dicts of tensors and Python values, written atomically and read with weights_only=True, so that
loading never runs code. Every stage writes one ({stage}.pt) and a resume state ({stage}.resume.pt); a later stage
takes its model shapes, tokenizer and task from the checkpoint it reads, and refuses a mismatch by name.
"""
import argparse
import hashlib
import json
import math
import pickle
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from model import GPT, GPTConfig
from support import distributed
from support.files import atomic_open, atomic_write

FORMAT = "tldr-rlhf/1"
# The stages whose checkpoint is a policy (an LM head): what evaluate.py, label.py and sample.py take.
POLICY_STAGES = ("sft", "ppo", "dpo")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, not ours, pickled code, or another stage, task or tokenizer."""


def policy_name(path, ckpt):
    """A policy checkpoint's name on pages and in files: its file name, with "ppo" read as "rloo" for a run of
    `ppo.py --estimator rloo`, since both estimators write ppo.pt (ppo_step20.pt -> rloo_step20)."""
    stem = Path(path).stem
    if ckpt["stage"] == "ppo" and ckpt.get("args", {}).get("estimator") == "rloo" and stem.startswith("ppo"):
        return "rloo" + stem[3:]
    return stem


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
    mid-save leaves the previous checkpoint intact). extra may hold tensors and state dicts (optimizer, RNG). Weights,
    metrics or extras that are not finite are refused (check_finite): the previous file stays."""
    ckpt = dict(format=FORMAT, stage=stage, task=task, tokenizer=tokenizer, config=asdict(model.config),
                model=model.state_dict(), args=plain(args or {}), step=step, metrics=plain(metrics or {}), **extra)
    check_finite(path, model=ckpt["model"], metrics=ckpt["metrics"], **extra)
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)



def save_final(out, model, *, stage, metrics, **meta):
    """The end of a stage: <out>/<stage>.pt, <stage>.json (its metrics, for scripts) and the resume state removed, in
    that order, so a run killed in between resumes and writes them again."""
    save_checkpoint(out / f"{stage}.pt", model, stage=stage, metrics=metrics, **meta)
    atomic_write(out / f"{stage}.json", json.dumps(metrics, indent=1) + "\n")
    (out / f"{stage}.resume.pt").unlink(missing_ok=True)

def load_checkpoint(path, stage=None, task=None, tokenizer=None, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint. stage (a name or a tuple of names), task and tokenizer are what
    the caller expects; anything else - a missing file, a file that is not a checkpoint, pickled code, another stage,
    task or tokenizer - is a CheckpointError that names the file and what was expected."""
    path = Path(path)
    want = (stage,) if isinstance(stage, str) else stage
    what = f"a {' or '.join(want)} checkpoint" if want else "a checkpoint"
    if not path.is_file():
        raise CheckpointError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'} "
                              f"(expected {what})")
    try:  # opened here first: is_zipfile takes a file it may not read for one that is no zip archive
        with open(path, "rb") as f:
            is_zip = zipfile.is_zipfile(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); expected {what}") from None
    if not is_zip:  # torch.save writes a zip archive
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


def input_digests(inputs):
    """{what: SHA-256} of the files a run reads, from {what: path} (what: a flag, or "train data"). A folder digests
    its files and their names; a value that names no file (a GPT-2 preset such as "gpt2", "synth-m") stands for
    itself. A resume compares these, so a run cannot continue on other inputs than it started with."""
    digests = {}
    for what, path in inputs.items():
        path = Path(path)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        h = hashlib.sha256(b"" if path.exists() else f"name {path}".encode())
        for f in files if path.exists() else []:
            h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        digests[what] = dict(path=str(path), sha256=h.hexdigest())
    return digests


def save_resume_state(path, model, optimizer, *, stage, task, tokenizer, args, step, inputs, **extra):
    """What --resume needs besides the weights: the optimizer, the torch RNG, the step, the digests of the run's
    inputs (input_digests) and a stage's extras."""
    save_checkpoint(path, model, stage=stage, task=task, tokenizer=tokenizer, args=args, step=step,
                    optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), inputs=inputs, **extra)


# Flags that change how a run is carried out but not what it computes: a resume may change them. Any other
# difference (seed, learning rate, batch sizes, model shape, ...) would silently splice two different runs.
RESUMABLE_CHANGES = {"resume", "stop_after", "device", "dtype", "compile", "out_dir", "cache_dir", "data_dir",
                     "micro_batch_size", "sample_batch_size", "eval_every", "save_every", "eval_n", "sample_n", "sft",
                     "reward", "model", "comparisons", "collect"}


def save_or_stop(out, model, optimizer, step, total_steps, *, stage, args, **meta):
    """The end of a training step of sft.py, reward.py or dpo.py: every --save-every steps and at --stop-after, the
    resume state <out>/<stage>.resume.pt (rank 0). True when --stop-after ends the run here."""
    if (step % args.save_every == 0 or step == args.stop_after) and distributed.is_main():
        save_resume_state(out / f"{stage}.resume.pt", model, optimizer, stage=stage, args=args, step=step, **meta)
    if step == args.stop_after and step < total_steps:
        print(f"{stage}: stopped after step {step} (--stop-after); continue with --resume")
        return True
    return False


def check_resume(path, stage, args, inputs, partial=False):
    """The resume state at path, if the resuming run's flags (args) and input files (input_digests) are the saved
    run's; a CheckpointError naming each difference if not: resumed on other settings or files, a run would
    silently splice two runs. partial: compare only the inputs given (a stage that checks before it has them all)."""
    state = load_checkpoint(path, stage=stage)
    saved, now = state.get("args") or {}, plain(args or {})
    changed = [k for k in sorted(saved.keys() & now.keys()) if k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {now[k]} (saved: {saved[k]})" for k in changed)
        raise CheckpointError(f"{path}: cannot resume with other settings: {flags}. Resume with the saved ones, "
                              f"or start anew without --resume")
    if "inputs" not in state:
        raise CheckpointError(f"{path}: written by an earlier version that did not record its input files, so a "
                              f"resume could splice two runs; start anew without --resume")
    before, nothing = state["inputs"], dict(path=None, sha256=None)
    other = [w for w in sorted(inputs.keys() if partial else before.keys() | inputs.keys())
             if before.get(w, nothing)["sha256"] != inputs.get(w, nothing)["sha256"]]
    if other:
        raise CheckpointError(f"{path}: cannot resume on other inputs than the run started with: " + "; ".join(
            f"{w} {inputs.get(w, nothing)['path']} is not the file it started with ({before.get(w, nothing)['path']})"
            for w in other) + ". Give it the files it started with, or start anew without --resume")
    return state


def load_resume_state(path, model, optimizer, stage, args, inputs):
    """Restore the weights, the optimizer and the torch RNG saved by save_resume_state, after check_resume; returns
    the checkpoint (its step and extras)."""
    state = check_resume(path, stage, args, inputs)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:  # the model built from today's flags has another shape
        raise CheckpointError(f"{path}: the saved weights do not fit this run's model ({str(e).splitlines()[0]}); "
                              f"start anew without --resume") from None
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
    kept = (f"the last resume state {resume_path} is kept" if Path(resume_path).exists()
            else "no resume state had been written yet")
    raise FloatingPointError(f"{where}: the loss is {float(loss)}; stopping before it reaches the weights; {kept}. "
                             f"{RESTART}")


# --resume keeps the saved settings and seed, so it would take the same steps to the same divergence.
RESTART = "Start anew with other settings (a lower --lr, a smaller --grad-clip), not with --resume"


def non_finite(values, name=""):
    """The name of the first NaN or infinite entry of values (a state dict, a dict of metrics, a tensor, a number,
    nested), or None when all are finite."""
    if isinstance(values, dict):
        return next((bad for k, v in values.items() if (bad := non_finite(v, f"{name}.{k}" if name else k))), None)
    if isinstance(values, (list, tuple)):
        return next((bad for i, v in enumerate(values) if (bad := non_finite(v, f"{name}[{i}]"))), None)
    if isinstance(values, torch.Tensor) and values.is_floating_point():
        return None if torch.isfinite(values).all() else name
    if isinstance(values, float):
        return None if math.isfinite(values) else name
    return None


def check_finite(path, **values):
    """Refuse to write path when any of values (weights, metrics, a bias) is NaN or infinite: a run that diverged
    on its last step, after the last loss check, would otherwise leave weights, or metrics such as an accuracy
    computed from NaN rewards, that look like results. Files already written stay as they were."""
    bad = non_finite(values)
    if bad:
        raise FloatingPointError(f"{path}: not written: {bad} is not finite (the run diverged after its last loss "
                                 f"check); the files already written are kept. {RESTART}")
