"""
Stage 3: PPO against the reward model, with a KL penalty to the SFT policy (the paper's section 3.4).

    python ppo.py --task synth               # the synthetic TL;DR on a CPU, minutes
    python ppo.py --task tldr --beta 0.05    # the paper's setting, one GPU

The policy and the reference start from sft.pt; the value network is a separate copy of the reward model (its
normalization bias included); the reward model is frozen. Each update: sample responses to a batch of training
posts at temperature 0.7, score them, shape the reward (the RM score once at the end, -beta * (log pi - log ref) on
every token), estimate advantages by GAE, and take 4 epochs of clipped PPO steps on policy and value.

Conventions (each tested in tests/test_ppo.py):
- Responses have a fixed length with EOS allowed; tokens after the first EOS are PAD; a response without EOS gets
  the fixed score --no-eos-score instead of the RM's.
- The score lands on the response's last real token: its EOS (index 2 of [t0, t1, EOS, PAD, PAD]).
- The same temperature divides the logits when sampling and in every log-prob forward, so the first minibatch of
  each update sees ratio exactly 1 and approx-KL 0: the old log-probs come from the same forward, in the same
  micro-batches, as that first minibatch.
- GAE with gamma 1, lambda 0.95; advantages whitened over the batch's real tokens; every mean is masked.
- Each episode samples with the noise of its own seed, and the losses are token means over the whole minibatch
  whose episodes are reshuffled every epoch, so --micro-batch-size, --sample-batch-size and the number of torchrun
  processes change the result only by float rounding.

Writes <out>/ppo.pt (the policy), <out>/ppo_step<N>.pt every --save-every updates (read a KL sweep off one run),
<out>/ppo.json, <out>/ppo.log.jsonl (one line per update).
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
from model import autocast, pick_dtype, response_logprobs, reward_at_eos, row_noise, trim_padding
from support import distributed
from support.checkpoint import (CheckpointError, input_digests, load_checkpoint, load_resume_state,
                                model_from_checkpoint, save_checkpoint, save_resume_state, stop_if_not_finite)
from support.cli import (add_run_args, add_task_args, fill_task_defaults, finite_float, fraction, nonnegative_float,
                         positive_float, positive_int)
from support.files import run_lock
from support.optim import configure_optimizers, optimizer_step, paper_lr
from support.steplog import StepLog

# tldr follows the paper and Huang et al. (2024): 512 episodes per update, 4 epochs, ~1M episodes, lr by model size.
# synth is sized for a 2-core CPU and was chosen by measurement (see README).
DEFAULTS = {
    "tldr": dict(episodes=1_000_000, rollout_batch_size=512, minibatch_size=64, micro_batch_size=16, lr=None,
                 eval_every=10, eval_n=256, save_every=100),
    "synth": dict(episodes=3200, rollout_batch_size=64, minibatch_size=16, micro_batch_size=16, lr=3e-5,
                  eval_every=10, eval_n=250, save_every=10),
}


# ---------------------------------------------------------------------------------------------------------------------
# the RLHF math: small pure functions, each tested against a hand-computed example

def masked_mean(x, mask, n=None):
    """Mean of x over the positions where mask is 1 (same shapes). n, when given, replaces the count of those
    positions: a micro-batch divides by its whole minibatch's count, so that micro-batches add up to its mean."""
    return (x * mask).sum() / (mask.sum() if n is None else n)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked positions; masked-out positions come back 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def shape_rewards(score, logp, ref_logp, mask, beta):
    """Per-token rewards of the paper's objective R(x, y) = r(x, y) - beta * log(pi(y|x) / ref(y|x)).
    score (B,), logp / ref_logp / mask (B, R). Returns rewards (B, R) and the per-token KL estimate (B, R): every
    real token pays -beta * (logp - ref_logp); the score lands on the last real token (the EOS)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = mask.sum(1).long() - 1  # (B,): index of the EOS, or of the last token when there is none
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation over response tokens. rewards, values, mask: (B, R); a masked position ends
    the episode (its value and advantage are 0). Returns advantages and returns (B, R)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip=0.2, n=None):
    """PPO's clipped surrogate (Schulman et al. 2017), masked. All (B, R); n as in masked_mean. Returns the loss,
    the fraction of tokens where the clip was active, and approx-KL 0.5 * E[(log ratio)^2] (0 when the policy has not
    moved)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipfrac = masked_mean((torch.abs(ratio - 1) > clip).float(), mask, n)
    return masked_mean(losses, mask, n), clipfrac, masked_mean(0.5 * log_ratio ** 2, mask, n)


def value_loss(values, old_values, returns, mask, clip=0.2, n=None):
    """Clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within clip of the rollout's value.
    All (B, R); n as in masked_mean. Returns the loss and the fraction of tokens where clipping bound."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask, n)
    return 0.5 * masked_mean(losses, mask, n), clipfrac


class AdaptiveKL:
    """Ziegler et al. (2019)'s controller: beta moves so the KL tracks a target, by at most 20% of n_steps/horizon
    per update: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, beta, target, horizon=10_000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_steps):
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


def explained_variance(values, returns, mask):
    mean = lambda x: masked_mean(x, mask)  # noqa: E731
    var = mean((returns - mean(returns)) ** 2)
    diff = returns - values
    return float(1 - mean((diff - mean(diff)) ** 2) / var)


# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p, "ppo")
    p.add_argument("--sft", help="policy and reference (default: <out>/sft.pt)")
    p.add_argument("--reward", help="reward model, and the value network's start (default: <out>/reward.pt)")
    # the objective
    p.add_argument("--beta", type=nonnegative_float, default=0.05, help="KL penalty coefficient (the paper: 0.05; "
                   "0: no penalty)")
    p.add_argument("--target-kl", type=positive_float, help="adapt beta so the KL per response tracks this many nats, "
                   "more than 0 (Ziegler et al. 2019); off by default: beta stays fixed")
    p.add_argument("--kl-horizon", type=positive_int, default=10_000,
                   help="episodes over which the adaptive beta can move")
    p.add_argument("--no-eos-score", type=finite_float, default=-1.0, help="the score of a response without EOS")
    p.add_argument("--temperature", type=positive_float, default=0.7, help="sampling temperature, more than 0: every "
                   "log-prob forward divides the logits by it too")
    # PPO
    p.add_argument("--episodes", type=positive_int,
                   help="responses sampled in all, a multiple of --rollout-batch-size (tldr: 1M, the paper's; synth: "
                   "3,200; the default is rounded down to whole rollout batches, e.g. 999,936 at 512)")
    p.add_argument("--rollout-batch-size", type=positive_int,
                   help="responses per update, over all processes under torchrun "
                   "(tldr: 512)")
    p.add_argument("--minibatch-size", type=positive_int,
                   help="responses per optimizer step within an update, over all "
                   "processes")
    p.add_argument("--micro-batch-size", type=positive_int, help="responses per forward pass in each process (scoring, "
                   "training): lower it to fit memory; it changes the result only by float rounding")
    p.add_argument("--sample-batch-size", type=positive_int,
                   help="responses sampled at once in each process (default: on a "
                   "GPU as many as half its free memory holds, on a CPU the process's whole share of the rollout "
                   "batch); it changes the result only by float rounding")
    p.add_argument("--ppo-epochs", type=positive_int, default=4, help="passes over each rollout batch")
    p.add_argument("--lr", type=positive_float, help="peak learning rate, decayed linearly to 0. tldr default: the "
                   "paper's PPO rates (1.5e-5 at 1.3B, 7e-6 at 6.7B) along their power law, but never above 1.5e-5 "
                   "(so 1.5e-5 for every GPT-2 up to 1.3B; see tldr_lr); synth: 3e-5")
    p.add_argument("--gamma", type=fraction, default=1.0, help="discount, 0 to 1")
    p.add_argument("--lam", type=fraction, default=0.95, help="GAE lambda, 0 to 1")
    p.add_argument("--clip", type=positive_float, default=0.2, help="policy ratio clip: the ratio is clipped to "
                   "1 - this .. 1 + this, more than 0")
    p.add_argument("--clip-value", type=positive_float, default=0.2, help="value clip: a new value is kept within this "
                   "of the rollout's, more than 0")
    p.add_argument("--vf-coef", type=nonnegative_float, default=0.1, help="weight of the value loss")
    p.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="clip the gradient norm (0: off)")
    # evaluation, checkpoints
    p.add_argument("--eval-every", type=positive_int,
                   help="updates between temperature-0 samples of fixed validation posts")
    p.add_argument("--eval-n", type=positive_int,
                   help="validation posts summarized then (synth: judged by the gold labeler)")
    p.add_argument("--save-every", type=positive_int,
                   help="updates between ppo_step<N>.pt checkpoints (and the resume state)")
    add_run_args(p, "ppo", compile="torch.compile the policy's one-token sampling step (a static KV cache, run as a "
                 "CUDA graph on a GPU; queries then keep their full padded length so every batch has one shape) and "
                 "the training forwards of policy and value: faster on GPUs after a minute or two of compiling. The "
                 "first minibatch's ratio is then 1 up to float rounding, not exactly: the compiled training graph "
                 "fuses its arithmetic differently from the rollout's forward")
    args = p.parse_args(argv)
    episodes_given = args.episodes is not None
    fill_task_defaults(args, DEFAULTS)
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
    # Rollout and training forwards use the same micro-batches (that is what makes the first ratio exactly 1), so
    # a micro-batch never spans two minibatches.
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


def tldr_lr(n_params):
    """The default PPO learning rate for the real task. The paper's rates (appendix B.1: 1.5e-5 at 1.3B, 7e-6 at 6.7B)
    fall with size; extended below 1.3B their power law would give 4.5e-5 at 124M, which no reproduction ran. What
    did run at these sizes is lower: Ziegler et al.'s code, the paper's predecessor, used 1e-5 for GPT-2 124M at 512
    episodes per update (its books tasks) and 2e-6 for its 124M TL;DR; Huang et al. (2024) 3e-6 from 1B to 6.9B. So
    the law is followed only downwards from the paper's 1.3B rate. Not tuned here (no GPU run yet): if the KL runs
    away or the policy collapses onto one summary, lower it."""
    return min(paper_lr("ppo", n_params), paper_lr("ppo", 1.3e9))


def build_models(args, enc, device):
    """Policy and reference from SFT; the value network a separate copy of the reward model (normalization bias
    included), trained alongside the policy; the reward model itself frozen."""
    sft_ckpt = load_checkpoint(args.sft, stage="sft", task=args.task, tokenizer=enc.name)
    rm_ckpt = load_checkpoint(args.reward, stage="reward", task=args.task, tokenizer=enc.name)
    policy = model_from_checkpoint(sft_ckpt).to(device)
    value = model_from_checkpoint(rm_ckpt).to(device)
    ref = model_from_checkpoint(sft_ckpt).to(device).eval().requires_grad_(False)
    rm = model_from_checkpoint(rm_ckpt).to(device).eval().requires_grad_(False)
    return policy, ref, value, rm


def micro_batches(n, size):
    return [slice(i, i + size) for i in range(0, n, size)]


# ---------------------------------------------------------------------------------------------------------------------
# one update: a rollout, the advantages, then the PPO epochs

def episode_seeds(seed, update, n):
    """A seed for each episode of an update, from (run seed, update, episode number): an episode's sample is the
    same whatever batch, micro-batch or process it is sampled in."""
    return [int(np.random.SeedSequence([seed, update, e]).generate_state(1)[0]) for e in range(n)]


def my_episodes(n, minibatch_size):
    """The episodes of a rollout batch of n that this process samples: its share of every minibatch of the first
    epoch, so that it trains its own samples first, in the micro-batches that scored them."""
    per, rank = minibatch_size // distributed.world_size(), distributed.rank()
    return np.concatenate([np.arange(k + rank * per, k + (rank + 1) * per) for k in range(0, n, minibatch_size)])


def episode_tokens(query, response, pad):
    """Episodes as one (B, T) sequence each: the queries' common left padding trimmed, then the (B, R) responses.
    Returns the tokens, their mask and the query length."""
    q, _ = trim_padding(query, pad)
    tokens = torch.cat([q, response], 1)
    return tokens, (tokens != pad).long(), q.size(1)


@torch.no_grad()
def rollout(policy, ref, value, rm, queries, seeds, args, pad, eos, device, dtype):
    """Section 3.4's episodes for this process's (N, Lq) left-padded queries: responses sampled at the temperature,
    --sample-batch-size at a time, each from its own seed; then, in the micro-batches that training uses (so the
    first minibatch's ratio is exactly 1), their log-probs under the policy and the reference, the value estimates
    and the reward model's score (--no-eos-score without EOS). Returns per-episode CPU tensors and the seconds
    spent sampling and scoring."""
    R, t0 = data.TASKS[args.task]["response_len"], time.time()
    policy.eval()
    responses = []
    for sb in micro_batches(len(queries), args.sample_batch_size):
        q = queries[sb] if args.compile else trim_padding(queries[sb], pad)[0]  # compiled: one shape for every batch
        with autocast(device, dtype):
            tokens = policy.generate(q, (q != pad).long(), R, args.temperature, eos, pad,
                                     noise=row_noise(seeds[sb], R).to(device), compile=args.compile)
        responses.append(tokens[:, q.size(1):])
    policy.train()
    response = torch.cat(responses).cpu()
    t1 = time.time()
    scored = []
    for mb in micro_batches(len(queries), args.micro_batch_size):
        tokens, mask, n_query = episode_tokens(queries[mb], response[mb].to(device), pad)
        with autocast(device, dtype):
            scored.append(dict(logp=response_logprobs(policy, tokens, mask, n_query, args.temperature),
                               ref_logp=response_logprobs(ref, tokens, mask, n_query, args.temperature),
                               values=value(tokens, mask, head_from=n_query - 1)[:, :-1].float(),
                               score=reward_at_eos(rm, tokens, mask)))
    batch = {k: torch.cat([s[k] for s in scored]).cpu() for k in scored[0]}
    batch.update(query=queries.cpu(), response=response, has_eos=(response == eos).any(1),
                 resp_mask=(response != pad).float())
    batch["score"] = torch.where(batch["has_eos"], batch["score"], torch.full_like(batch["score"], args.no_eos_score))
    return batch, dict(sampling_s=t1 - t0, scoring_s=time.time() - t1)


def gather_episodes(batch, mine):
    """Under torchrun: every process's episodes on every process, in the rollout batch's order (mine: this
    process's episode numbers), so that advantages are whitened over the whole batch and later epochs can shuffle
    the whole batch. One process: the batch itself."""
    if distributed.world_size() == 1:
        return batch
    where = torch.as_tensor(distributed.gather(mine.tolist())).argsort()
    return {k: distributed.gather(v)[where] for k, v in batch.items()}


def advantages(batch, beta, args):
    """The paper's reward (the score at the EOS, the KL penalty on every token), GAE, and whitened advantages."""
    rewards, batch["kl"] = shape_rewards(batch["score"], batch["logp"], batch["ref_logp"], batch["resp_mask"], beta)
    adv, batch["returns"] = gae(rewards, batch["values"], batch["resp_mask"], args.gamma, args.lam)
    batch["advantages"] = masked_whiten(adv, batch["resp_mask"])
    return batch


def ppo_update(train_policy, train_value, optimizer, batch, lr, update, args, pad, device, dtype):
    """--ppo-epochs passes over the rollout batch in minibatches of --minibatch-size episodes, one optimizer step
    each, with the clipped policy and value losses as token means over the whole minibatch, however it is split into
    micro-batches and processes. The first epoch goes in the rollout's order, so its first minibatch replays the
    very forwards that scored it (ratio 1); each later epoch reshuffles the episodes. Returns the mean statistics
    and those of the first micro-batch."""
    world, rank, n = distributed.world_size(), distributed.rank(), len(batch["score"])
    per = args.minibatch_size // world  # this process's episodes of a minibatch
    params = [p for model in (train_policy, train_value) for p in model.parameters()]
    sums, first = np.zeros(6), None
    for epoch in range(args.ppo_epochs):
        order = np.arange(n) if epoch == 0 else np.random.default_rng([args.seed, update, epoch]).permutation(n)
        for start in range(0, n, args.minibatch_size):
            minibatch = order[start:start + args.minibatch_size]
            n_tokens = batch["resp_mask"][minibatch].sum().item()  # the denominator of every token mean
            mine = minibatch[rank * per:(rank + 1) * per]
            parts = micro_batches(len(mine), args.micro_batch_size)
            for i, mb in enumerate(parts):
                ep = {k: batch[k][mine[mb]].to(device) for k in ("query", "response", "logp", "values", "advantages",
                                                                 "returns", "resp_mask")}
                tokens, mask, n_query = episode_tokens(ep["query"], ep["response"], pad)
                skip = i < len(parts) - 1  # DDP averages the gradients once, after the minibatch's last part
                with (distributed.no_sync(train_policy, skip), distributed.no_sync(train_value, skip),
                      autocast(device, dtype)):
                    new_logp, entropy = response_logprobs(train_policy, tokens, mask, n_query, args.temperature,
                                                          with_entropy=True)
                    vpred = train_value(tokens, mask, head_from=n_query - 1)[:, :-1].float()
                m = ep["resp_mask"]
                pg, clipfrac, approx_kl = policy_loss(new_logp, ep["logp"], ep["advantages"], m, args.clip, n_tokens)
                vf, vf_clipfrac = value_loss(vpred, ep["values"], ep["returns"], m, args.clip_value, n_tokens)
                loss = pg + args.vf_coef * vf
                stop_if_not_finite(loss.detach(), f"update {update + 1}", Path(args.out_dir) / "ppo.resume.pt")
                (loss * world).backward()  # DDP divides the processes' summed gradients by their number
                if first is None:
                    first = [(new_logp - ep["logp"]).abs().max().exp().item() - 1,
                             masked_mean(0.5 * (new_logp - ep["logp"]) ** 2, m).item()]
                sums += [pg.item(), vf.item(), clipfrac.item(), vf_clipfrac.item(), approx_kl.item(),
                         masked_mean(entropy, m, n_tokens).item()]
            optimizer_step(optimizer, params, lr, args.grad_clip)
    n_minibatches = args.ppo_epochs * (n // args.minibatch_size)
    names = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "entropy")
    stats = dict(zip(names, distributed.sum_over_ranks((sums / n_minibatches).tolist())))
    first = dict(zip(("ratio_max_dev", "approx_kl"), distributed.mean_over_ranks(first)))
    return stats, first


# ---------------------------------------------------------------------------------------------------------------------
# around the loop: evaluation, the logged row, checkpoints and resume

def load_prompts(args, enc):
    """The training posts' tokenized queries (rank 0 writes the cache, the others read it) and the first --eval-n
    validation posts."""
    task = data.TASKS[args.task]
    train_records = data.load_split(args.task, "train", args.data_dir)
    with distributed.main_first():
        queries = data.prepare_sft(train_records, enc, task["query_len"], task["response_len"], args.cache_dir)["query"]
    return queries, data.load_split(args.task, "valid", args.data_dir)[:args.eval_n]


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
        import synth
        row["gold_win_rate"] = synth.gold_win_rate(records, texts)
    return row


def update_row(update, batch, stats, first, beta, lr, args, seconds):
    """What one update logs (the DESIGN's list), for the whole rollout batch (every process holds all of it)."""
    kl_sum, score = batch["kl"].sum(1), batch["score"]
    return dict(update=update, episodes=update * args.rollout_batch_size, score=score.mean().item(),
                rlhf_reward=(score - beta * kl_sum).mean().item(), kl=kl_sum.mean().item(), beta=beta,
                entropy=stats["entropy"], approx_kl=stats["approx_kl"], first_minibatch_approx_kl=first["approx_kl"],
                first_minibatch_ratio_dev=first["ratio_max_dev"], clipfrac=stats["clipfrac"],
                policy_loss=stats["policy_loss"], value_loss=stats["value_loss"],
                value_clipfrac=stats["value_clipfrac"],
                explained_variance=explained_variance(batch["values"], batch["returns"], batch["resp_mask"]),
                length=batch["resp_mask"].sum(1).mean().item(), eos_fraction=batch["has_eos"].float().mean().item(),
                lr=lr, episodes_per_s=args.rollout_batch_size / sum(seconds.values()), **seconds)


def print_row(row, n_updates):
    print(f"update {row['update']}/{n_updates} | score {row['score']:.3f} | kl {row['kl']:.2f} | reward "
          f"{row['rlhf_reward']:.3f} | entropy {row['entropy']:.2f} | approx-kl {row['approx_kl']:.4f} (first "
          f"{row['first_minibatch_approx_kl']:.1e}) | clip {row['clipfrac']:.3f} | vf {row['value_loss']:.3f} ev "
          f"{row['explained_variance']:.2f} | len {row['length']:.1f} eos {row['eos_fraction']:.2f} | "
          f"{row['episodes_per_s']:.0f} ep/s (sample {row['sampling_s']:.1f} s, score {row['scoring_s']:.1f} s, "
          f"train {row['training_s']:.1f} s)" + (f" | gold {row['gold_win_rate']:.3f}" if "gold_win_rate" in row
                                                 else ""))
    for s in row.get("samples", [])[:2]:
        print(f"    ref:{s['reference']}\n    ppo:{s['policy']}")


def save_resume(path, policy, value, optimizer, kl_ctl, inputs, meta):
    """What --resume needs besides the policy and its optimizer: the value network and the adaptive beta. (Sampling
    needs no state: each episode's noise comes from its seed.)"""
    if distributed.is_main():
        save_resume_state(path, policy, optimizer, value=value.state_dict(),
                          beta=kl_ctl.beta if kl_ctl else meta["args"].beta, inputs=inputs, **meta)


def resume(path, policy, value, optimizer, kl_ctl, args, inputs):
    """Restore what save_resume wrote (refused if the flags or input files changed); returns the update to continue
    from."""
    state = load_resume_state(path, policy, optimizer, "ppo", args, inputs)
    value.load_state_dict(state["value"])
    if kl_ctl:
        kl_ctl.beta = state["beta"]
    return state["step"]


def sample_batch_size(args, policy, share, device, dtype):
    """--sample-batch-size, or on a GPU as many episodes as half its free memory holds: each needs its KV cache
    (2 x layers x (query + response) x width values) and about as much again for the prompt pass's activations. On a
    CPU, the process's whole share of the rollout batch."""
    if args.sample_batch_size:
        return min(args.sample_batch_size, share)
    if device.type != "cuda":
        return share
    task, cfg = data.TASKS[args.task], policy.config
    per_episode = 2 * 2 * cfg.n_layer * (task["query_len"] + task["response_len"]) * cfg.n_embd * dtype.itemsize
    return max(1, min(share, int(0.5 * torch.cuda.mem_get_info(device)[0] // per_episode)))


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
    save_checkpoint(out / "ppo.pt", policy, stage="ppo", task=args.task, tokenizer=enc.name, args=args, step=update,
                    metrics=metrics)
    (out / "ppo.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "ppo.resume.pt").unlink(missing_ok=True)
    print("ppo: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    print(f"ppo: peak memory {peak:.2f} GB ({'CUDA max allocated' if device.type == 'cuda' else 'resident set'})")
    print(f"ppo: wrote {out / 'ppo.pt'}")


# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    with run_lock(args.out_dir, "ppo"):  # one run per out-dir: a second would mix its files with this one's
        run(args)


def run(args):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = distributed.setup(args.device)  # the process group too, under torchrun
    dtype = pick_dtype(device, args.dtype)
    enc = data.get_tokenizer(data.TASKS[args.task]["tokenizer"])
    pad, eos = data.pad_id(enc), enc.eot_token

    policy, ref, value, rm = build_models(args, enc, device)
    # what a resume must find unchanged: the SFT and reward models and the posts
    files = {f"--data-dir {split}": data.split_path(args.task, split, args.data_dir) for split in ("train", "valid")}
    inputs = input_digests({"--sft": args.sft, "--reward": args.reward, **files})
    if args.lr is None:  # tldr: by model size (0 is refused by --lr's type, never read as unset)
        args.lr = tldr_lr(policy.num_params())
    optimizer = configure_optimizers(torch.nn.ModuleList([policy, value]), args.lr, device_type=device.type)
    # Training forwards go through DDP under torchrun, which averages the gradients of policy and value.
    train_policy, train_value = distributed.wrap(policy, device), distributed.wrap(value, device)
    if args.compile:
        train_policy, train_value = torch.compile(train_policy), torch.compile(train_value)
    kl_ctl = AdaptiveKL(args.beta, args.target_kl, args.kl_horizon) if args.target_kl else None
    # prompts: the SFT training posts, reshuffled every pass; fixed validation posts for the periodic samples
    queries, valid_records = load_prompts(args, enc)
    if len(queries) < args.rollout_batch_size:
        raise data.DataError(f"{len(queries)} training posts make no rollout batch of --rollout-batch-size "
                             f"{args.rollout_batch_size}")
    n_updates = args.episodes // args.rollout_batch_size
    share = args.rollout_batch_size // distributed.world_size()
    args.sample_batch_size = sample_batch_size(args, policy, share, device, dtype)
    update = resume(out / "ppo.resume.pt", policy, value, optimizer, kl_ctl, args, inputs) if args.resume else 0
    print(f"ppo: {args.task}, policy {policy.num_params():,} parameters, {n_updates} updates of "
          f"{args.rollout_batch_size} episodes, lr {args.lr:.2e}, beta {args.beta}"
          + (f" (adaptive, target KL {args.target_kl})" if kl_ctl else "") + f", {device} {dtype}"
          + (f", {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
          + f"; sampling {args.sample_batch_size} episodes at a time")

    log = StepLog(out / "ppo.log.jsonl", resume_step=update if args.resume else None, key="update")
    t_start = time.time()
    if update == 0:  # the starting point, on the same posts as every later evaluation: the SFT policy itself
        start = evaluate_policy(policy, valid_records, enc, args, device, dtype)
        log.write(dict(update=0, **start))
        print(f"update 0/{n_updates} (the SFT policy)" + (f" | gold {start['gold_win_rate']:.3f}"
                                                           if "gold_win_rate" in start else ""))
    policy.train()
    value.train()
    while update < n_updates:
        beta = kl_ctl.beta if kl_ctl else args.beta
        lr = args.lr * (1 - update / n_updates)  # linear decay to 0
        idx = data.batch_indices(len(queries), args.rollout_batch_size, update, args.seed)
        seeds = episode_seeds(args.seed, update, len(idx))
        mine = my_episodes(len(idx), args.minibatch_size)  # the episodes this process samples
        batch, seconds = rollout(policy, ref, value, rm, torch.as_tensor(queries[idx[mine]], device=device).long(),
                                 [seeds[e] for e in mine], args, pad, eos, device, dtype)
        batch = advantages(gather_episodes(batch, mine), beta, args)
        t0 = time.time()
        stats, first = ppo_update(train_policy, train_value, optimizer, batch, lr, update, args, pad, device, dtype)
        seconds["training_s"] = time.time() - t0
        update += 1
        row = update_row(update, batch, stats, first, beta, lr, args, seconds)
        row["elapsed"] = time.time() - t_start
        if kl_ctl:
            kl_ctl.update(row["kl"], args.rollout_batch_size)
        if update % args.eval_every == 0 or update == n_updates:
            row.update(evaluate_policy(policy, valid_records, enc, args, device, dtype))
        log.write(row)
        print_row(row, n_updates)
        meta = dict(stage="ppo", task=args.task, tokenizer=enc.name, args=args, step=update)
        if update % args.save_every == 0 and distributed.is_main():
            save_checkpoint(out / f"ppo_step{update}.pt", policy, **meta)
        if update % args.save_every == 0 or update == args.stop_after:
            save_resume(out / "ppo.resume.pt", policy, value, optimizer, kl_ctl, inputs, meta)
        if update == args.stop_after and update < n_updates:
            print(f"ppo: stopped after update {update} (--stop-after); continue with --resume")
            return
    log.close()

    final = evaluate_policy(policy, valid_records, enc, args, device, dtype, desc="ppo: final validation summaries")
    if distributed.is_main():  # the metrics and files are rank 0's
        finish(policy, final, args, enc, out, update, t_start, device)


if __name__ == "__main__":
    try:
        main()
        distributed.finish()
    except (data.DataError, CheckpointError, OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"ppo.py: error: {e}")
