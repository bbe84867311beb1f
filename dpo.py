"""
DPO (Rafailov et al. 2023): the SFT policy trained directly on the comparisons that reward.py trains on. No reward
model, no sampling, no RL.

The paper's RLHF maximizes reward - beta * KL(policy || SFT). That objective's optimal policy is
pi(y|x) = ref(y|x) exp(r(x, y) / beta) / Z(x), so beta * log(pi / ref) is a reward, up to a term of x alone. Put
into the reward model's loss, -log sigmoid(r(x, y_w) - r(x, y_l)), Z(x) cancels and what is left trains the policy
itself:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

y_w is the summary the labeler preferred, y_l the other; the reference ref is the SFT policy, frozen. A log-prob is
summed over the summary's tokens, its EOS included, exactly as PPO's ratio and KL are (model.response_logprobs).

    python dpo.py --task synth    # the comparisons reward.py collected (<out>/comparisons/), from <out>/sft.pt
    python dpo.py --task tldr     # OpenAI's human comparisons, their train split

Writes <out>/dpo.pt (a policy: evaluate.py, label.py and sample.py take it like sft.pt or ppo.pt), <out>/dpo.json
and <out>/dpo.log.jsonl. Defaults for tldr are the DPO paper's (its appendix B): beta 0.5 for TL;DR, batch 64,
learning rate 1e-6 warmed up linearly over 150 steps and then constant; one epoch. AdamW instead of its RMSprop:
this project's one optimizer (support/optim.py).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import synth  # noqa: F401  the synthetic task's world: its tokenizer's words
from model import autocast, pick_dtype, response_logprobs, trim_padding
from support import distributed, synth_comparisons
from support.checkpoint import (CheckpointError, check_resume, input_digests, load_checkpoint, load_resume_state,
                                model_from_checkpoint, save_final, save_or_stop, stop_if_not_finite)
from support.cli import (add_run_args, add_task_args, fill_task_defaults, nonnegative_float, positive_float,
                         positive_int)
from support.comparisons import load_comparisons, split_rows
from support.files import run_lock
from support.optim import configure_optimizers, optimizer_step
from support.steplog import StepLog

# synth: tuned for the quick start's synth-s policy and its 10,000 comparisons (docs/stages.md says how)
DEFAULTS = {
    "tldr": dict(beta=0.5, lr=1e-6, warmup_steps=150, batch_size=64, micro_batch_size=8, eval_every=200,
                 save_every=200, val_size=2048),
    "synth": dict(beta=0.1, lr=1e-4, warmup_steps=10, batch_size=64, micro_batch_size=None, eval_every=25,
                  save_every=50, val_size=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p, "dpo")
    p.add_argument("--sft", help="the SFT checkpoint: the policy's start and the frozen reference (default: "
                   "<out>/sft.pt)")
    p.add_argument("--comparisons", nargs="+", help="comparison files (default tldr: <data>/comparisons/*.json; "
                   "synth: <out>/comparisons/synth_*.json, which reward.py collects)")
    p.add_argument("--beta", type=positive_float, help="the KL coefficient DPO's loss is derived under: larger keeps "
                   "the policy nearer the SFT policy (tldr: 0.5, the DPO paper's for TL;DR; synth: 0.1)")
    p.add_argument("--batch-size", type=positive_int, help="comparisons per optimizer step, over all processes under "
                   "torchrun (the DPO paper: 64)")
    p.add_argument("--micro-batch-size", type=positive_int, help="comparisons per forward/backward in each process "
                   "(lower it to fit memory)")
    p.add_argument("--lr", type=positive_float, help="learning rate after the warm-up (tldr: 1e-6; synth: 1e-4)")
    p.add_argument("--warmup-steps", type=nonnegative_float, help="steps of linear warm-up from 0, then constant "
                   "(tldr: 150; synth: 10)")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the comparisons, a fraction "
                   "allowed")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay on 2-D weights")
    p.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--eval-every", type=positive_int, help="steps between held-out accuracies on --val-size "
                   "comparisons")
    p.add_argument("--val-size", type=positive_int, help="held-out comparisons for the accuracy logged during training")
    p.add_argument("--save-every", type=positive_int, help="steps between resumable checkpoints (<out>/dpo.resume.pt)")
    add_run_args(p, "dpo")
    args = p.parse_args(argv)
    fill_task_defaults(args, DEFAULTS)
    args.sft = args.sft or str(Path(args.out_dir) / "sft.pt")
    args.micro_batch_size = args.micro_batch_size or max(1, args.batch_size // distributed.world_size())
    distributed.check_batch(p, "batch-size", args.batch_size, "micro-batch-size", args.micro_batch_size)
    return args


# --------------------------------------------------------------------------------------------------------------------
# the idea

def summary_logprobs(model, query, response0, response1, pad):
    """Summed log-probs (B,), (B,) of two responses to the same (B, Lq) queries, in one forward over the stacked
    pairs: the summary's tokens up to and including its EOS, at temperature 1, as PPO sums them."""
    tokens = torch.cat([torch.cat([query, response0], 1), torch.cat([query, response1], 1)])
    tokens, cut = trim_padding(tokens, pad)
    n_query = query.size(1) - cut
    logp = response_logprobs(model, tokens, (tokens != pad).long(), n_query).float()
    return (logp * (tokens[:, n_query:] != pad)).sum(1).chunk(2)


def dpo_loss(logp0, logp1, ref0, ref1, choice, beta):
    """-log sigmoid(beta * (log-ratio of the preferred - log-ratio of the other)), averaged; the accuracy of the
    implicit reward beta * log(pi / ref) (the preferred one higher), and that reward's margin."""
    r0, r1 = beta * (logp0 - ref0), beta * (logp1 - ref1)
    margin = torch.where(choice == 0, r0 - r1, r1 - r0)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean(), margin.mean()


def warmup_lr(step, lr, warmup_steps):
    """The DPO paper's schedule: linear from 0 over warmup_steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


# --------------------------------------------------------------------------------------------------------------------
# the loop's pieces

def pair_batch(arrays, part, device):
    q, a, b = data.tensors(arrays, part, ("query", "response0", "response1"), device)
    return q, a, b, torch.as_tensor(arrays["choice"][part], device=device)


def train_step(train_forward, ref, arrays, idx, args, pad, device, dtype):
    """Forward and backward of one global batch of comparisons (rows idx) in micro-batches; returns the batch's
    mean loss, accuracy and margin."""
    accum = args.batch_size // (args.micro_batch_size * distributed.world_size())
    mine = idx[distributed.shard(len(idx))]
    sums = [0.0, 0.0, 0.0]
    for m in range(accum):
        q, a, b, choice = pair_batch(arrays, mine[m * args.micro_batch_size:(m + 1) * args.micro_batch_size], device)
        with torch.no_grad(), autocast(device, dtype):
            ref0, ref1 = summary_logprobs(ref, q, a, b, pad)
        with distributed.no_sync(train_forward, skip=m < accum - 1), autocast(device, dtype):
            logp0, logp1 = summary_logprobs(train_forward, q, a, b, pad)
        loss, acc, margin = dpo_loss(logp0, logp1, ref0, ref1, choice, args.beta)
        (loss / accum).backward()
        sums = [s + v.item() / accum for s, v in zip(sums, (loss, acc, margin))]
    return distributed.mean_over_ranks(sums)


@torch.no_grad()
def held_out(policy, ref, arrays, rows, args, pad, device, dtype):
    """The loss, the implicit reward's accuracy and its mean margin on held-out rows, each process scoring its
    shard; the same figures as reward.py's accuracy, so the two can be read side by side."""
    policy.eval()
    mine = rows[distributed.shard(len(rows))]
    margins, losses = [], []
    for i in range(0, len(mine), args.micro_batch_size):
        q, a, b, choice = pair_batch(arrays, mine[i:i + args.micro_batch_size], device)
        with autocast(device, dtype):
            logp0, logp1 = summary_logprobs(policy, q, a, b, pad)
            ref0, ref1 = summary_logprobs(ref, q, a, b, pad)
        r0, r1 = args.beta * (logp0 - ref0), args.beta * (logp1 - ref1)
        margin = torch.where(choice == 0, r0 - r1, r1 - r0)
        margins.append(margin.cpu())
        losses.append(-F.logsigmoid(margin).cpu())
    policy.train()
    margins, losses = (distributed.gather(torch.cat(x).numpy()) for x in (margins, losses))
    return dict(loss=float(losses.mean()), accuracy=float((margins > 0).mean()), margin=float(margins.mean()),
                n=len(margins))


def comparison_files(args):
    """The comparisons reward.py trains on: for synth the files it collected, which must exist."""
    if args.comparisons or args.task == "tldr":
        return args.comparisons  # tldr without --comparisons: load_comparisons reads <data>/comparisons/
    files = synth_comparisons.reward_comparison_files(Path(args.out_dir) / "comparisons")
    for f in files:
        if not f.is_file():
            raise data.DataError(f"{f} is missing: dpo.py trains on the comparisons reward.py collects; run "
                                 f"`python reward.py --out-dir {args.out_dir}` first, or pass --comparisons")
    return [str(f) for f in files]


def main(argv=None):
    args = parse_args(argv)
    with run_lock(args.out_dir, "dpo"):  # one run per out-dir: a second would mix its files with this one's
        run(args)


def run(args):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = distributed.setup(args.device)
    dtype = pick_dtype(device, args.dtype)
    task = data.TASKS[args.task]
    enc = data.get_tokenizer(task["tokenizer"])
    pad = data.pad_id(enc)

    sft_ckpt = load_checkpoint(args.sft, stage="sft", task=args.task, tokenizer=enc.name)
    args.comparisons = comparison_files(args)
    records, files = load_comparisons(args, enc, sft_ckpt, device, dtype)
    inputs = input_digests({"--sft": args.sft, **{f"--comparisons {i + 1}": f for i, f in enumerate(files)}})
    if args.resume:
        check_resume(out / "dpo.resume.pt", "dpo", args, inputs)
    with distributed.main_first():
        arrays = data.prepare_comparisons(records, enc, task["query_len"], task["rm_response_len"], args.cache_dir)
    train_rows, eval_rows, val_rows = split_rows(arrays, args)
    total_steps = int(args.epochs * len(train_rows)) // args.batch_size

    policy = model_from_checkpoint(sft_ckpt).to(device)
    ref = model_from_checkpoint(sft_ckpt).to(device).eval().requires_grad_(False)
    optimizer = configure_optimizers(policy, args.lr, args.weight_decay, device_type=device.type)
    step = (load_resume_state(out / "dpo.resume.pt", policy, optimizer, "dpo", args, inputs)["step"]
            if args.resume else 0)
    forward = torch.compile(policy) if args.compile else policy
    train_forward = distributed.wrap(forward, device)
    before = held_out(forward, ref, arrays, val_rows, args, pad, device, dtype) if step == 0 else None
    print(f"dpo: {args.task}, {policy.num_params():,} parameters, {len(train_rows):,} training comparisons, "
          f"{len(eval_rows):,} held out, {total_steps} steps of {args.batch_size}, beta {args.beta}, lr {args.lr:.2e}, "
          f"{device} {dtype}")

    log = StepLog(out / "dpo.log.jsonl", resume_step=step if args.resume else None)
    t_start = time.time()
    policy.train()
    while step < total_steps:
        t0 = time.time()
        lr = warmup_lr(step, args.lr, args.warmup_steps)
        idx = train_rows[data.batch_indices(len(train_rows), args.batch_size, step, args.seed)]
        loss, acc, margin = train_step(train_forward, ref, arrays, idx, args, pad, device, dtype)
        stop_if_not_finite(loss, f"step {step + 1}", out / "dpo.resume.pt")
        optimizer_step(optimizer, policy.parameters(), lr, args.grad_clip)
        step += 1
        row = dict(step=step, loss=loss, accuracy=acc, margin=margin, lr=lr,
                   pairs_per_s=len(idx) / (time.time() - t0), elapsed=time.time() - t_start)
        if step % args.eval_every == 0 or step == total_steps:
            row["val"] = held_out(forward, ref, arrays, val_rows, args, pad, device, dtype)
        log.write(row)
        print(f"step {step}/{total_steps} | loss {loss:.4f} | acc {acc:.3f} | margin {margin:.3f} | lr {lr:.2e} | "
              f"{row['pairs_per_s']:.0f} pairs/s | {row['elapsed']:.1f}s"
              + (f" | val acc {row['val']['accuracy']:.3f}" if "val" in row else ""))
        if save_or_stop(out, policy, optimizer, step, total_steps, stage="dpo", args=args, task=args.task,
                        tokenizer=enc.name, inputs=inputs):
            return
    log.close()

    after = held_out(forward, ref, arrays, eval_rows, args, pad, device, dtype)  # every held-out comparison
    if not distributed.is_main():
        return
    metrics = dict(held_out=after, train_comparisons=len(train_rows), steps=step, beta=args.beta,
                   minutes=(time.time() - t_start) / 60, **({"val_before": before} if before else {}))
    save_final(out, policy, stage="dpo", task=args.task, tokenizer=enc.name, args=args, step=step, metrics=metrics)
    print(f"dpo: held-out accuracy of the implicit reward {after['accuracy']:.3f} (n={after['n']:,}), loss "
          f"{after['loss']:.4f}, mean margin {after['margin']:.3f}")
    print(f"dpo: wrote {out / 'dpo.pt'} in {metrics['minutes']:.1f} min; judge it with "
          f"`python evaluate.py --task {args.task} --policies {out / 'sft.pt'} {out / 'dpo.pt'}`")


if __name__ == "__main__":
    try:
        main()
        distributed.finish()
    except (data.DataError, CheckpointError, OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"dpo.py: error: {e}")
