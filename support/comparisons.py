"""The comparisons a stage learns from (reward.py, dpo.py): their files, read, or for the synthetic task collected
first with the simulated labelers; the check that they belong to the task (and to this synthetic world); and the
split into training rows and held-out rows."""
from pathlib import Path

import numpy as np

import data
import synth
from support import distributed, synth_comparisons


def load_comparisons(args, enc, sft_ckpt, device, dtype):
    """The comparison rows for this task and their files: read from files, or (synth) collected first with the
    simulated labelers."""
    if args.comparisons:
        files = [Path(f) for f in args.comparisons]
    elif args.task == "tldr":
        files = sorted((Path(args.data_dir) / "comparisons").glob("*.json"))
        if not files:
            raise data.DataError(f"no comparison files in {Path(args.data_dir) / 'comparisons'}; run "
                                 "`python -m support.openai_data` (or pass --comparisons)")
    else:
        files = synth_comparisons.reward_comparison_files(Path(args.out_dir) / "comparisons")
        # Under torchrun rank 0 collects alone (sampling and labeling stay those of one process); the others wait.
        if distributed.is_main():
            synth_comparisons.collect_if_stale(args, enc, sft_ckpt, files, device, dtype)
        distributed.barrier()
    records = data.read_comparisons(files)
    check_task(records, files, args.task)
    return records, files


def check_task(records, files, task):
    """Refuse comparisons of the other task, or of another version of the synthetic world (another WORLD)."""
    worlds = {synth.world_of(r["id"]) for r in records}
    if task == "synth" and None in worlds:
        raise data.DataError(f"{files}: comparisons of Reddit posts, but --task synth")
    if task == "synth" and worlds - {synth.WORLD}:
        others = ", ".join(sorted(worlds - {synth.WORLD}))
        raise data.DataError(f"{files}: comparisons of another synthetic world ({others}) than this synth.py's "
                             f"({synth.WORLD}): collect them anew (reward.py without --comparisons, or synth.py "
                             "collect)")
    if task == "tldr" and worlds - {None}:
        raise data.DataError(f"{files}: comparisons of the synthetic task, but --task tldr")


def split_rows(arrays, args):
    """Training rows (the train split's TL;DR comparisons), every held-out row (valid1, valid2; TL;DR and CNN/DM,
    never trained on) and the first --val-size held-out TL;DR rows for the accuracy logged during training."""
    split = arrays["split"]
    train_rows = np.flatnonzero((split == "train") & ~arrays["is_cnndm"])
    eval_rows = np.flatnonzero(split != "train")
    val_rows = eval_rows[~arrays["is_cnndm"][eval_rows]][:args.val_size]
    if len(train_rows) < args.batch_size or not len(eval_rows):
        raise data.DataError(f"{len(train_rows)} training and {len(eval_rows)} held-out comparisons: too few")
    return train_rows, eval_rows, val_rows
