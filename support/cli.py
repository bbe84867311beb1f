"""The flags every stage shares - the task and its files, and the run itself (seed, device, precision, resume) - and
the device they name."""
import argparse
import math
from pathlib import Path

import torch

import data


SEED_MAX = 2**32 - 1  # every generator a seed reaches takes 0 .. 2**32-1 (numpy's refuse negatives)


def number_in(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse type for a finite int or float from low to high (None: unbounded; an open end excludes the bound
    itself). A negative learning rate, a fraction of 2 or nan would otherwise run to the end and mean nothing; the
    error says the range: "must be more than 0, got -1"."""
    ends = [f"{'more than' if low_open else 'at least'} {low}" if low is not None else "",
            f"{'less than' if high_open else 'at most'} {high}" if high is not None else ""]
    bounds = (f"between {low} and {high}" if all(ends) and not (low_open or high_open)
              else " and ".join(e for e in ends if e))

    def in_range(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if ((low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return in_range


positive_int = number_in(int, 1)  # counts and sizes: 0 or -8 batches would divide by zero or run nothing
positive_float = number_in(float, 0, low_open=True)  # rates, clip ranges, temperatures that divide logits
nonnegative_float = number_in(float, 0)  # coefficients and temperatures where 0 switches something off
nonnegative_int = number_in(int, 0)  # counts where 0 means skip
fraction = number_in(float, 0, 1)  # shares of pairs
finite_float = number_in(float)  # any score, but not nan or inf
warmup_fraction = number_in(float, 0, 1, high_open=True)  # of the steps; at 1 no step would be left to decay
seed_int = number_in(int, 0, SEED_MAX)


def add_task_args(p, stage):
    """The flags every stage shares for its task and files."""
    p.add_argument("--task", choices=list(data.TASKS), default="synth", help="the paper's Reddit TL;DR or the "
                   "offline synthetic TL;DR")
    p.add_argument("--data-dir", help="the task's data (default: data/tldr or data/synth)")
    p.add_argument("--out-dir", help=f"where {stage}.pt and its logs go, and earlier stages' checkpoints are found "
                   "(default: out/<task>)")
    p.add_argument("--cache-dir", default="data_cache", help="tokenized arrays, reused while the data is unchanged")


def fill_task_defaults(args, defaults):
    """Flags left unset take the task's value from the stage's table of defaults; directories follow the task."""
    for key, value in defaults[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out_dir = args.out_dir or f"out/{args.task}"
    for parent in [Path(args.out_dir), *Path(args.out_dir).parents]:  # mkdir would fail later, with a traceback
        if parent.exists() and not parent.is_dir():
            raise SystemExit(f"error: --out-dir {args.out_dir}: {parent} is a file, not a folder")
    args.data_dir = args.data_dir or data.TASKS[args.task]["data_dir"]


def add_run_args(p, stage, compile="torch.compile the model"):
    """The flags every stage shares for the run itself: seed, device, precision, compile (its help), resume."""
    p.add_argument("--seed", type=seed_int, default=0, help=f"seed for initialization, data order and sampling "
                   f"(0 to {SEED_MAX})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype: auto = bf16 on GPUs that support it, fp32 otherwise")
    if compile:
        p.add_argument("--compile", action="store_true", help=compile)
    p.add_argument("--resume", action="store_true", help=f"continue an interrupted run from <out>/{stage}.resume.pt")
    p.add_argument("--stop-after", type=positive_int, help="stop after this many steps as if killed, leaving the "
                   "resume state (for time-sliced jobs, and the resume tests)")


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to PyTorch here; use --device cpu")
    return device
