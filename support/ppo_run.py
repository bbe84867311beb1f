"""What a PPO run does around ppo.py's loop, and a reader of the RLHF may skip: the flags' checks, the models and
the prompts loaded, how many episodes to sample at once, the periodic evaluation, the logged row and the printed line,
checkpoints and --resume, the final files."""
import json
import resource
import time
from pathlib import Path

import torch

import data
import synth  # the synthetic task's world: its tokenizer's words, the gold rubric
from model import pick_dtype
from support import distributed
from support.checkpoint import (input_digests, load_checkpoint, load_resume_state, model_from_checkpoint,
                                save_checkpoint, save_final, save_resume_state)
from support.cli import fill_task_defaults
from support.optim import paper_lr


# ---------------------------------------------------------------------------------------------------------------------
# setup

def complete_args(p, args, defaults):
    """The parsed flags completed: the task's defaults for those not given, the input checkpoints' default
    paths, --micro-batch-size lowered to a process's part of a minibatch, the default --episodes rounded down to
    whole rollout batches; and an argparse error (p.error) for batch flags that cannot split into whole
    minibatches, micro-batches and processes."""
    episodes_given = args.episodes is not None
    fill_task_defaults(args, defaults)
    if args.samples_per_prompt is None:
        args.samples_per_prompt = 4 if args.estimator == "rloo" else 1
    if args.estimator == "rloo" and args.samples_per_prompt < 2:
        p.error(f"--estimator rloo needs --samples-per-prompt of at least 2 (a baseline of the others), not "
                f"{args.samples_per_prompt}")
    if args.rollout_batch_size % args.samples_per_prompt:
        p.error(f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of --samples-per-prompt "
                f"{args.samples_per_prompt}")
    args.sft = args.sft or str(Path(args.out_dir) / "sft.pt")
    args.reward = args.reward or str(Path(args.out_dir) / "reward.pt")
    for big, small in (("rollout-batch-size", "minibatch-size"), ("rollout-batch-size", "micro-batch-size")):
        a, b = getattr(args, big.replace("-", "_")), getattr(args, small.replace("-", "_"))
        if a % min(a, b):
            p.error(f"--{big} {a} is not a multiple of --{small} {b}")
    # Under torchrun each process takes an equal share of every rollout batch and minibatch.
    world = distributed.world_size()
    if args.minibatch_size % world:
        p.error(f"--minibatch-size {args.minibatch_size} is not a multiple of the {world} processes")
    per_process = args.minibatch_size // world
    distributed.check_batch(p, "minibatch-size", args.minibatch_size, "micro-batch-size",
                            min(per_process, args.micro_batch_size))
    # Rollout and training forwards use the same micro-batches (that is what makes the first ratio exactly 1),
    # so a micro-batch never spans two minibatches.
    args.micro_batch_size = min(args.micro_batch_size, per_process)
    if world > 1:
        distributed.check_batch(p, "rollout-batch-size", args.rollout_batch_size, "micro-batch-size",
                                args.micro_batch_size)
    if args.episodes < args.rollout_batch_size:
        p.error(f"--episodes {args.episodes} is less than one --rollout-batch-size {args.rollout_batch_size}")
    if args.episodes % args.rollout_batch_size:  # every update samples a whole rollout batch
        if episodes_given:
            p.error(f"--episodes {args.episodes} is not a multiple of --rollout-batch-size {args.rollout_batch_size}")
        args.episodes -= args.episodes % args.rollout_batch_size  # the task's default, as its help says
    if args.minibatch_size > args.rollout_batch_size:
        p.error(f"--minibatch-size {args.minibatch_size} is larger than --rollout-batch-size {args.rollout_batch_size}")
    return args


def setup(args):
    """The out-dir, the seed, the device (under torchrun: joining the process group), the dtype, the tokenizer."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = distributed.setup(args.device)
    return out, device, pick_dtype(device, args.dtype), data.get_tokenizer(data.TASKS[args.task]["tokenizer"])


def build_models(args, enc, device):
    """Policy and reference from SFT; the value network a separate copy of the reward model
    (normalization bias included), trained alongside the policy (none for RLOO: None); the reward model itself
    frozen."""
    sft_ckpt = load_checkpoint(args.sft, stage="sft", task=args.task, tokenizer=enc.name)
    rm_ckpt = load_checkpoint(args.reward, stage="reward", task=args.task, tokenizer=enc.name)
    policy = model_from_checkpoint(sft_ckpt).to(device)
    value = None if args.estimator == "rloo" else model_from_checkpoint(rm_ckpt).to(device)
    ref = model_from_checkpoint(sft_ckpt).to(device).eval().requires_grad_(False)
    rm = model_from_checkpoint(rm_ckpt).to(device).eval().requires_grad_(False)
    return policy, ref, value, rm


def tldr_lr(n_params):
    """ppo.py's default learning rate for the real task. The paper's rates (appendix B.1: 1.5e-5 at
    1.3B, 7e-6 at 6.7B) fall with size; extended below 1.3B their power law would give 4.5e-5 at 124M,
    which no reproduction ran. What did run at these sizes is lower: Ziegler et al.'s code, the
    paper's predecessor, used 1e-5 for GPT-2 124M at 512 episodes per update (its books tasks) and
    2e-6 for its 124M TL;DR; Huang et al. (2024) 3e-6 from 1B to 6.9B. So the law is followed only
    downwards from the paper's 1.3B rate. Not tuned here (no GPU run yet): if the KL runs away or the
    policy collapses onto one summary, lower it."""
    return min(paper_lr("ppo", n_params), paper_lr("ppo", 1.3e9))


def load_prompts(args, enc):
    """The training posts' tokenized queries (rank 0 writes the cache, the others read it) and the first --eval-n
    validation posts."""
    task = data.TASKS[args.task]
    train_records = data.load_split(args.task, "train", args.data_dir)
    with distributed.main_first():
        queries = data.prepare_sft(train_records, enc, task["query_len"], task["response_len"], args.cache_dir)["query"]
    if len(queries) < args.rollout_batch_size:
        raise data.DataError(f"{len(queries)} training posts make no rollout batch of --rollout-batch-size "
                             f"{args.rollout_batch_size}")
    return queries, data.load_split(args.task, "valid", args.data_dir)[:args.eval_n]


def resume_inputs(args):
    """The digests of the files a resumed run must find unchanged: the SFT and reward models and the posts."""
    files = {f"--data-dir {split}": data.split_path(args.task, split, args.data_dir) for split in ("train", "valid")}
    return input_digests({"--sft": args.sft, "--reward": args.reward, **files})


def episodes_sampled_at_once(args, policy, device, dtype):
    """--sample-batch-size, at most the process's share of the rollout batch; by default on a GPU as many as half
    its free memory holds (the KV cache, 2 x layers x (query + response) x width values per episode, and about as
    much again for the prompt pass), on a CPU the whole share."""
    share = args.rollout_batch_size // distributed.world_size()
    if args.sample_batch_size:
        return min(args.sample_batch_size, share)
    if device.type != "cuda":
        return share
    task, cfg = data.TASKS[args.task], policy.config
    per_episode = 2 * 2 * cfg.n_layer * (task["query_len"] + task["response_len"]) * cfg.n_embd * dtype.itemsize
    return max(1, min(share, int(0.5 * torch.cuda.mem_get_info(device)[0] // per_episode)))


def print_start(args, policy, n_updates, kl_ctl, device, dtype):
    print(f"ppo: {args.task}, policy {policy.num_params():,} parameters, {n_updates} updates of "
          f"{args.rollout_batch_size} episodes, lr {args.lr:.2e}, beta {args.beta}"
          + (f" (adaptive, target KL {args.target_kl})" if kl_ctl else "") + f", {device} {dtype}"
          + (f", {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
          + f"; sampling {args.sample_batch_size} episodes at a time")


# ---------------------------------------------------------------------------------------------------------------------
# each update

def evaluate_policy(policy, records, enc, args, device, dtype, desc=None):
    """Temperature-0 summaries of the fixed validation posts; for synth the gold preference over references. Under
    torchrun each process summarizes its shard of the posts and every process gets all the summaries."""
    policy.eval()
    mine = records[distributed.shard(len(records))]
    desc = desc if distributed.is_main() else None  # a progress bar
    texts = distributed.gather(data.summarize(policy, mine, enc, args.task, 0.0, args.micro_batch_size, device, dtype,
                                              desc=desc))
    policy.train()
    row = dict(samples=[dict(reference=data.as_response(r["summary"]), policy=t) for r, t in zip(records[:3], texts)])
    if args.task == "synth":
        row["gold_win_rate"] = synth.gold_win_rate(records, texts)
    return row


def log_the_sft_policy(log, policy, valid_records, enc, args, device, dtype, n_updates):
    """Update 0 in the log: the SFT policy evaluated, on the same posts as every later evaluation."""
    start = evaluate_policy(policy, valid_records, enc, args, device, dtype)
    log.write(dict(update=0, **start))
    print(f"update 0/{n_updates} (the SFT policy)"
          + (f" | gold {start['gold_win_rate']:.3f}" if "gold_win_rate" in start else ""))


def update_row(update, batch, stats, beta, lr, args, seconds, t_start):
    """What one update logs, for the whole rollout batch. Under torchrun the processes' statistics are joined:
    each one's losses and fractions are its part of token means over whole minibatches, so they add up; the first
    micro-batch's checks are averaged."""
    summed = dict(zip(stats, distributed.sum_over_ranks(list(stats.values()))))
    stats = {k: v / distributed.world_size() if k.startswith("first_") else v for k, v in summed.items()}
    kl_sum, score, mask = batch["kl"].sum(1), batch["score"], batch["resp_mask"]
    if "returns" in batch:  # a value network was trained
        stats["explained_variance"] = explained_variance(batch["values"], batch["returns"], mask)
    return dict(update=update, episodes=update * args.rollout_batch_size, score=score.mean().item(),
                rlhf_reward=(score - beta * kl_sum).mean().item(), kl=kl_sum.mean().item(), beta=beta, **stats,
                length=mask.sum(1).mean().item(), eos_fraction=batch["has_eos"].float().mean().item(), lr=lr,
                episodes_per_s=args.rollout_batch_size / sum(seconds.values()), **seconds,
                elapsed=time.time() - t_start)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the real tokens: 1 for a perfect value network."""
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    var = mean((returns - mean(returns)) ** 2)
    diff = returns - values
    return float(1 - mean((diff - mean(diff)) ** 2) / var)


def print_row(row, n_updates):
    """One line per update (the value network's part only when it was trained), and two of the samples."""
    value = (f" | vf {row['value_loss']:.3f} ev {row['explained_variance']:.2f}" if "value_loss" in row else "")
    print(f"update {row['update']}/{n_updates} | score {row['score']:.3f} | kl {row['kl']:.2f} | reward "
          f"{row['rlhf_reward']:.3f} | entropy {row['entropy']:.2f} | approx-kl {row['approx_kl']:.4f} (first "
          f"{row['first_minibatch_approx_kl']:.1e}) | clip {row['clipfrac']:.3f}{value} | len {row['length']:.1f} "
          f"eos {row['eos_fraction']:.2f} | {row['episodes_per_s']:.0f} ep/s (sample {row['sampling_s']:.1f} s, "
          f"score {row['scoring_s']:.1f} s, train {row['training_s']:.1f} s)"
          + (f" | gold {row['gold_win_rate']:.3f}" if "gold_win_rate" in row else ""))
    for s in row.get("samples", [])[:2]:
        print(f"    ref:{s['reference']}\n    ppo:{s['policy']}")


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints, --resume and the end

def save_checkpoints(out, update, policy, value, optimizer, kl_ctl, inputs, enc, args):
    """ppo_step<N>.pt every --save-every updates, and the resume state then and at --stop-after (rank 0): what
    --resume needs besides the policy and its optimizer is the value network and the adaptive beta. (Sampling needs
    no state: each episode's noise comes from its seed.)"""
    meta = dict(stage="ppo", task=args.task, tokenizer=enc.name, args=args, step=update)
    if update % args.save_every == 0 and distributed.is_main():
        save_checkpoint(out / f"ppo_step{update}.pt", policy, **meta)
    if (update % args.save_every == 0 or update == args.stop_after) and distributed.is_main():
        save_resume_state(out / "ppo.resume.pt", policy, optimizer, value=None if value is None else value.state_dict(),
                          beta=kl_ctl.beta if kl_ctl else args.beta, inputs=inputs, **meta)


def resume(out, policy, value, optimizer, kl_ctl, args, inputs):
    """Restore what save_checkpoints wrote (refused if the flags or input files changed); returns the update to
    continue from."""
    state = load_resume_state(out / "ppo.resume.pt", policy, optimizer, "ppo", args, inputs)
    if value is not None:
        value.load_state_dict(state["value"])
    if kl_ctl:
        kl_ctl.beta = state["beta"]
    return state["step"]


def finish(policy, final, args, enc, out, update, t_start, device):
    """The final checkpoint, ppo.json and the summary line (rank 0). The SFT policy's gold preference, measured
    before the first update on the same posts, is read back from the log's first row."""
    rows = [json.loads(line) for line in (out / "ppo.log.jsonl").read_text().splitlines()]
    if "gold_win_rate" in rows[0]:
        final["sft_gold_win_rate"] = rows[0]["gold_win_rate"]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    metrics = dict(updates=update, episodes=update * args.rollout_batch_size, kl=rows[-1].get("kl"),
                   score=rows[-1].get("score"), minutes=(time.time() - t_start) / 60, peak_memory_gb=peak,
                   **{k: v for k, v in final.items() if k != "samples"})
    save_final(out, policy, stage="ppo", task=args.task, tokenizer=enc.name, args=args, step=update, metrics=metrics)
    print("ppo: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    print(f"ppo: peak memory {peak:.2f} GB ({'CUDA max allocated' if device.type == 'cuda' else 'resident set'})")
    print(f"ppo: wrote {out / 'ppo.pt'}")
