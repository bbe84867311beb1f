"""
Stage 2: a reward model trained on comparisons (the paper's section 3.4).

The SFT model with a scalar head in place of the LM head learns to predict which of two summaries a labeler
preferred: loss -log sigmoid(r(x, y_preferred) - r(x, y_other)), the reward read at the summary's EOS token. After
one epoch a bias makes the reference summaries of the training posts score 0 on average; PPO's value network starts
from this model, bias included.

    python reward.py --task synth    # collects comparisons of SFT samples with the simulated labelers, then trains
    python reward.py --task tldr     # OpenAI's human comparisons: train split; valid1/valid2 and CNN/DM reported

Writes <out>/reward.pt, <out>/reward.json (accuracy overall, per split, batch, confidence, TL;DR and CNN/DM apart,
each with its standard error) and <out>/reward.log.jsonl; for synth also <out>/comparisons/synth_{train,valid}.json.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import synth  # the synthetic task's world: its tokenizer's words, its labelers
from model import autocast, pick_dtype, reward_at_eos, trim_padding
from support import distributed, synth_comparisons
from support.comparisons import load_comparisons, split_rows
from support.checkpoint import (CheckpointError, check_resume, input_digests, load_checkpoint, load_resume_state,
                                model_from_checkpoint, save_final, save_or_stop, stop_if_not_finite)
from support.cli import (add_run_args, add_task_args, fill_task_defaults, fraction, nonnegative_float, positive_float,
                         positive_int, warmup_fraction)
from support.files import run_lock
from support.optim import configure_optimizers, cosine_lr, optimizer_step, paper_lr
from support.steplog import StepLog

DEFAULTS = {
    "tldr": dict(batch_size=64, micro_batch_size=8, lr=None, warmup=0.0, eval_every=200, save_every=200,
                 norm_n=4096, val_size=2048),
    "synth": dict(batch_size=64, micro_batch_size=None, lr=1.5e-3, warmup=0.05, eval_every=25, save_every=50,
                  norm_n=2000, val_size=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p, "reward")
    p.add_argument("--sft", help="the SFT checkpoint the reward model starts from (default: <out>/sft.pt)")
    p.add_argument("--comparisons", nargs="+", help="comparison files (default tldr: <data>/comparisons/*.json; "
                   "synth: <out>/comparisons/synth_*.json, collected first when missing)")
    # synthetic collection (the paper's step 1, with simulated labelers)
    p.add_argument("--collect", action="store_true", help="synth: collect new comparisons even if files exist")
    p.add_argument("--train-posts", type=positive_int, default=10000, help="synth: training posts, one comparison each")
    p.add_argument("--valid-posts", type=positive_int, default=1000, help="synth: held-out validation posts, one each")
    p.add_argument("--samples", type=positive_int, default=2,
                   help="synth: SFT samples per post to pair with each other")
    p.add_argument("--temperature", type=nonnegative_float, default=0.7, help="synth: sampling temperature of those "
                   "samples; 0.7 is the temperature of most of the released comparisons' samples (at 1.0 more pairs "
                   "hold a blatant slip that labelers always catch and a small RM cannot check, see docs/results.md; "
                   "at 0 both samples are the same, so every pair is one of them and the reference)")
    p.add_argument("--ref-fraction", type=fraction, default=0.25, help="synth: fraction of pairs with the reference "
                   "(0 to 1)")
    p.add_argument("--labelers", type=positive_int, default=10, help="synth: simulated labelers")
    # optimization
    p.add_argument("--batch-size", type=positive_int,
                   help="comparisons per optimizer step, over all processes under torchrun "
                   "(the paper: 64)")
    p.add_argument("--micro-batch-size", type=positive_int,
                   help="comparisons per forward/backward in each process (lower it "
                   "to fit memory)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate. tldr default: the paper's RM rates "
                   "(1.5e-5 at 1.3B, 5e-6 at 6.7B) extrapolated by their power law to the model size (7.2e-5 for "
                   "124M, 1.4e-5 for 1.5B); synth: 1.5e-3")
    p.add_argument("--warmup", type=warmup_fraction, help="fraction of steps with linear warm-up, at least 0 and less "
                   "than 1; then cosine decay to 0")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the comparisons, a fraction "
                   "allowed (the paper: 1; more overfits)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay on 2-D weights")
    p.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="clip the gradient norm (0: off)")
    # evaluation, normalization and logging
    p.add_argument("--eval-every", type=positive_int,
                   help="steps between held-out accuracies on --val-size comparisons")
    p.add_argument("--val-size", type=positive_int, help="held-out comparisons for the accuracy logged during training")
    p.add_argument("--norm-n", type=positive_int, help="training posts whose reference summaries set the bias (mean 0)")
    p.add_argument("--save-every", type=positive_int,
                   help="steps between resumable checkpoints (<out>/reward.resume.pt)")
    add_run_args(p, "reward")
    args = p.parse_args(argv)
    fill_task_defaults(args, DEFAULTS)
    args.sft = args.sft or str(Path(args.out_dir) / "sft.pt")
    # synth: each process's share of the batch in one pass
    args.micro_batch_size = args.micro_batch_size or max(1, args.batch_size // distributed.world_size())
    distributed.check_batch(p, "batch-size", args.batch_size, "micro-batch-size", args.micro_batch_size)
    return args


def pair_rewards(rm, query, response0, response1, pad, eos):
    """Rewards (B,), (B,) of two responses to the same (B, Lq) queries, in one forward over the stacked pairs. Each
    is read at the response's EOS, the last real token (model.reward_at_eos); every compared response has one."""
    tokens = torch.cat([torch.cat([query, response0], 1), torch.cat([query, response1], 1)])
    tokens, _ = trim_padding(tokens, pad)
    r = reward_at_eos(rm, tokens, (tokens != pad).long(), eos)
    return r.chunk(2)


def preference_loss(r0, r1, choice):
    """-log sigmoid(r_preferred - r_other), averaged, and the accuracy (the preferred one scored higher)."""
    margin = torch.where(choice == 0, r0 - r1, r1 - r0)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


@torch.no_grad()
def all_rewards(rm, arrays, rows, args, enc, device, dtype):
    """Rewards of both responses of the given comparison rows: (N,), (N,) numpy."""
    out0, out1 = [], []
    for i in range(0, len(rows), args.micro_batch_size):
        part = rows[i:i + args.micro_batch_size]
        q, a, b = data.tensors(arrays, part, ("query", "response0", "response1"), device)
        with autocast(device, dtype):
            r0, r1 = pair_rewards(rm, q, a, b, data.pad_id(enc), enc.eot_token)
        out0.append(r0.float().cpu())
        out1.append(r1.float().cpu())
    return torch.cat(out0).numpy(), torch.cat(out1).numpy()


@torch.no_grad()
def reference_rewards(rm, records, enc, args, device, dtype):
    """Rewards of the reference summaries of records (the normalization target)."""
    task = data.TASKS[args.task]
    arrays = data.prepare_sft(records, enc, task["query_len"], task["response_len"], args.cache_dir)
    pad, out = data.pad_id(enc), []
    for i in range(0, len(arrays["query"]), args.micro_batch_size):
        q, r = data.tensors(arrays, slice(i, i + args.micro_batch_size), ("query", "response"), device)
        tokens, _ = trim_padding(torch.cat([q, r], 1), pad)
        with autocast(device, dtype):
            out.append(reward_at_eos(rm, tokens, (tokens != pad).long(), enc.eot_token).float().cpu())
    return torch.cat(out).numpy()


def accuracy_report(correct, arrays, rows, task):
    """Accuracy with its standard error, overall and per group: the task's posts (tldr or synth) and CNN/DM articles
    apart, then per split, batch and labeler confidence within each."""
    def acc(mask):
        p, n = float(correct[mask].mean()), int(mask.sum())
        return dict(accuracy=p, stderr=math.sqrt(p * (1 - p) / n), n=n)

    report = {}
    cnndm = arrays["is_cnndm"][rows]
    for name, part in ((task, ~cnndm), ("cnndm", cnndm)):
        if not part.any():
            continue
        report[name] = dict(overall=acc(part))
        for field in ("split", "batch", "confidence"):
            values = arrays[field][rows]
            groups = {str(v): acc(part & (values == v)) for v in sorted(set(values[part].tolist()))}
            report[name][f"per_{field}"] = groups
    return report


def train_step(train_forward, arrays, idx, args, enc, device, dtype):
    """Forward and backward of one global batch of comparisons (the rows idx) in micro-batches; returns the batch's
    mean loss and accuracy."""
    accum = args.batch_size // (args.micro_batch_size * distributed.world_size())  # micro-batches per process
    mine = idx[distributed.shard(len(idx))]  # this process's rows of the global batch
    loss_sum, acc_sum = 0.0, 0.0
    for m in range(accum):
        part = mine[m * args.micro_batch_size:(m + 1) * args.micro_batch_size]
        q, a, b = data.tensors(arrays, part, ("query", "response0", "response1"), device)
        choice = torch.as_tensor(arrays["choice"][part], device=device)
        with distributed.no_sync(train_forward, skip=m < accum - 1), autocast(device, dtype):
            r0, r1 = pair_rewards(train_forward, q, a, b, data.pad_id(enc), enc.eot_token)
        loss, acc = preference_loss(r0.float(), r1.float(), choice)
        (loss / accum).backward()  # DDP then averages over the processes: the mean over the global batch
        loss_sum, acc_sum = loss_sum + loss.item() / accum, acc_sum + acc.item() / accum
    return distributed.mean_over_ranks([loss_sum, acc_sum])


def rewards_of(rm, arrays, rows, args, enc, device, dtype):
    """all_rewards of rows, each process scoring its shard; every process gets them all, in order."""
    mine = rows[distributed.shard(len(rows))]
    return tuple(distributed.gather(r) for r in all_rewards(rm, arrays, mine, args, enc, device, dtype))


def held_out_accuracy(rm, arrays, rows, args, enc, device, dtype):
    rm.eval()
    r0, r1 = rewards_of(rm, arrays, rows, args, enc, device, dtype)
    rm.train()
    return float(((r1 > r0) == (arrays["choice"][rows] == 1)).mean())


def normalize(rm, forward, enc, args, device, dtype):
    """Section 3.4: the bias that gives the reference summaries of training posts a mean reward of 0. Every process
    scores a shard of the posts and applies the same bias. Returns the references' rewards before and after."""
    rm.eval()
    norm_records = data.load_split(args.task, "train", args.data_dir)[:args.norm_n]
    mine = norm_records[distributed.shard(len(norm_records))]
    before = distributed.gather(reference_rewards(forward, mine, enc, args, device, dtype))
    with torch.no_grad():
        rm.score.bias -= float(before.mean())
    return before, before - before.mean()  # the bias moves every reward by the same amount


def final_metrics(rm, arrays, records, eval_rows, r0, r1, before, after, train_rows, args, step, t_start):
    correct = (r1 > r0) == (arrays["choice"][eval_rows] == 1)
    both = np.concatenate([r0, r1])
    metrics = dict(accuracy=accuracy_report(correct, arrays, eval_rows, args.task), train_comparisons=len(train_rows),
                   steps=step, minutes=(time.time() - t_start) / 60, norm_bias=rm.score.bias.item(),
                   reference_reward_before=float(before.mean()), reference_reward_after=float(after.mean()),
                   reward_mean=float(both.mean()), reward_std=float(both.std()))
    if args.task == "synth":  # the ceiling: how often a second simulated labeler agrees on the held-out pairs
        metrics.update(synth_comparisons.second_opinion_metrics([records[i] for i in arrays["index"][eval_rows]],
                                                    args.labelers, args.seed))
    return metrics


def print_report(metrics, args, out):
    for name, rep in metrics["accuracy"].items():
        o = rep["overall"]
        print(f"reward: {name} held-out accuracy {o['accuracy']:.3f} +- {o['stderr']:.3f} (n={o['n']:,})")
        for field in ("per_split", "per_confidence", "per_batch"):  # a batch: a file, e.g. your labels
            if field != "per_batch" or len(rep[field]) > 1:
                print("  " + field.removeprefix("per_") + ": " + ", ".join(
                    f"{k} {v['accuracy']:.3f}+-{v['stderr']:.3f}" for k, v in rep[field].items()))
    if "labeler_agreement" in metrics:
        print(f"reward: simulated labelers agree with each other {metrics['labeler_agreement']:.3f} +- "
              f"{metrics['labeler_agreement_stderr']:.3f} on the same pairs (the ceiling)")
    print(f"reward: references score {metrics['reference_reward_before']:.3f} -> "
          f"{metrics['reference_reward_after']:.3f} after normalization; all held-out rewards "
          f"{metrics['reward_mean']:.3f} +- {metrics['reward_std']:.3f}")
    print(f"reward: wrote {out / 'reward.pt'} in {metrics['minutes']:.1f} min")


def main(argv=None):
    args = parse_args(argv)
    with run_lock(args.out_dir, "reward"):  # one run per out-dir: a second would mix its files with this one's
        run(args)


def run(args):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = distributed.setup(args.device)  # the process group too, under torchrun
    dtype = pick_dtype(device, args.dtype)
    task = data.TASKS[args.task]
    enc = data.get_tokenizer(task["tokenizer"])

    # the SFT model: the reward model's starting point and, for synth, the policy whose samples are compared
    sft_ckpt = load_checkpoint(args.sft, stage="sft", task=args.task, tokenizer=enc.name)
    # what a resume must find unchanged: the SFT weights, the posts that set the bias, the comparisons (checked
    # before a synth collection could replace them, then once they are read)
    inputs = input_digests({"--sft": args.sft, "--data-dir train": data.split_path(args.task, "train", args.data_dir)})
    if args.resume:
        check_resume(out / "reward.resume.pt", "reward", args, inputs, partial=True)
    records, files = load_comparisons(args, enc, sft_ckpt, device, dtype)
    inputs.update(input_digests({f"--comparisons {i + 1}": f for i, f in enumerate(files)}))
    with distributed.main_first():
        arrays = data.prepare_comparisons(records, enc, task["query_len"], task["rm_response_len"], args.cache_dir)
    train_rows, eval_rows, val_rows = split_rows(arrays, args)
    total_steps = int(args.epochs * len(train_rows)) // args.batch_size

    # the SFT trunk with a fresh scalar head, N(0, 1/(d+1)) (initialized in GPT)
    torch.manual_seed(args.seed)  # the head's draw must not depend on whether comparisons were collected first
    rm = model_from_checkpoint(sft_ckpt, head="scalar").to(device)
    if args.lr is None:  # tldr: by model size (0 is refused by --lr's type, never read as unset)
        args.lr = paper_lr("reward", rm.num_params())
    optimizer = configure_optimizers(rm, args.lr, args.weight_decay, device_type=device.type)
    step = (load_resume_state(out / "reward.resume.pt", rm, optimizer, "reward", args, inputs)["step"]
            if args.resume else 0)
    forward = torch.compile(rm) if args.compile else rm
    train_forward = distributed.wrap(forward, device)  # DDP under torchrun: gradients averaged in backward()
    world = distributed.world_size()
    print(f"reward: {args.task}, {rm.num_params():,} parameters, {len(train_rows):,} training comparisons, "
          f"{len(eval_rows):,} held out, {total_steps} steps of {args.batch_size} "
          f"({args.batch_size // (args.micro_batch_size * world)} x {args.micro_batch_size}"
          + (f" x {world} processes" if world > 1 else "") + f"), lr {args.lr:.2e}, {device} {dtype}")

    # one epoch over the training comparisons
    log = StepLog(out / "reward.log.jsonl", resume_step=step if args.resume else None)
    t_start = time.time()
    rm.train()
    while step < total_steps:
        t0 = time.time()
        lr = cosine_lr(step, total_steps, args.lr, args.warmup)
        idx = train_rows[data.batch_indices(len(train_rows), args.batch_size, step, args.seed)]
        loss, acc = train_step(train_forward, arrays, idx, args, enc, device, dtype)
        stop_if_not_finite(loss, f"step {step + 1}", out / "reward.resume.pt")
        optimizer_step(optimizer, rm.parameters(), lr, args.grad_clip)
        step += 1
        row = dict(step=step, loss=loss, accuracy=acc, lr=lr, pairs_per_s=len(idx) / (time.time() - t0),
                   elapsed=time.time() - t_start)
        if step % args.eval_every == 0 or step == total_steps:
            row["val_accuracy"] = held_out_accuracy(forward, arrays, val_rows, args, enc, device, dtype)
        log.write(row)
        print(f"step {step}/{total_steps} | loss {loss:.4f} | acc {acc:.3f} | lr {lr:.2e} | "
              f"{row['pairs_per_s']:.0f} pairs/s | {row['elapsed']:.1f}s"
              + (f" | val acc {row['val_accuracy']:.3f}" if "val_accuracy" in row else ""))
        if save_or_stop(out, rm, optimizer, step, total_steps, stage="reward", args=args, task=args.task,
                        tokenizer=enc.name, inputs=inputs):
            return
    log.close()

    before, after = normalize(rm, forward, enc, args, device, dtype)
    r0, r1 = rewards_of(forward, arrays, eval_rows, args, enc, device, dtype)  # every held-out comparison
    if not distributed.is_main():
        return  # the metrics and files are rank 0's
    metrics = final_metrics(rm, arrays, records, eval_rows, r0, r1, before, after, train_rows, args, step, t_start)
    save_final(out, rm, stage="reward", task=args.task, tokenizer=enc.name, args=args, step=step, metrics=metrics,
               norm_bias=rm.score.bias.item())
    print_report(metrics, args, out)


if __name__ == "__main__":
    try:
        main()
        distributed.finish()
    except (data.DataError, CheckpointError, OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"reward.py: error: {e}")
