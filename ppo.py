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

Writes <out>/ppo.pt (the policy), <out>/ppo_step<N>.pt every --save-every updates (read a KL sweep off one run),
<out>/ppo.json, <out>/ppo.log.jsonl (one line per update).
"""
import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
from model import (autocast, configure_optimizers, paper_lr, pick_dtype, response_logprobs, reward_at_eos,
                   trim_padding)
from support import distributed
from support.checkpoint import (CheckpointError, load_checkpoint, load_resume_state, model_from_checkpoint,
                                save_checkpoint, save_resume_state)
from support.cli import add_run_args, add_task_args, fill_task_defaults

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

def masked_mean(x, mask, across_ranks=False):
    """Mean of x over the positions where mask is 1 (same shapes). across_ranks: over the positions of every
    process under torchrun, as if their batches were one."""
    if across_ranks:
        total = distributed.all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
        return total[0] / total[1]
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, eps=1e-8, across_ranks=False):
    """(x - mean) / std over the masked positions (of every process, across_ranks); masked-out positions come back
    0."""
    mean = masked_mean(x, mask, across_ranks)
    var = masked_mean((x - mean) ** 2, mask, across_ranks)
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


def policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017), masked. All (B, R). Returns the loss, the fraction of tokens
    where the clip was active, and approx-KL 0.5 * E[(log ratio)^2] (0 when the policy has not moved)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipfrac = masked_mean((torch.abs(ratio - 1) > clip).float(), mask)
    return masked_mean(losses, mask), clipfrac, masked_mean(0.5 * log_ratio ** 2, mask)


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within clip of the rollout's value.
    All (B, R). Returns the loss and the fraction of tokens where clipping bound."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)
    return 0.5 * masked_mean(losses, mask), clipfrac


class AdaptiveKL:
    """Ziegler et al. (2019)'s controller: beta moves so the KL tracks a target, by at most 20% of n_steps/horizon
    per update: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, beta, target, horizon=10_000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_steps):
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


def explained_variance(values, returns, mask, across_ranks=False):
    mean = lambda x: masked_mean(x, mask, across_ranks)  # noqa: E731
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
    p.add_argument("--beta", type=float, default=0.05, help="KL penalty coefficient (the paper: 0.05)")
    p.add_argument("--target-kl", type=float, help="adapt beta so the KL per response tracks this many nats "
                   "(Ziegler et al. 2019); off by default: beta stays fixed")
    p.add_argument("--kl-horizon", type=int, default=10_000, help="episodes over which the adaptive beta can move")
    p.add_argument("--no-eos-score", type=float, default=-1.0, help="the score of a response without EOS")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, used in every log-prob "
                   "forward too")
    # PPO
    p.add_argument("--episodes", type=int, help="responses sampled in all (tldr: 1M, the paper's; synth: 3,200)")
    p.add_argument("--rollout-batch-size", type=int, help="responses per update, over all processes under torchrun "
                   "(tldr: 512)")
    p.add_argument("--minibatch-size", type=int, help="responses per optimizer step within an update, over all "
                   "processes")
    p.add_argument("--micro-batch-size", type=int, help="responses per forward pass in each process (sampling, "
                   "scoring, training): lower it to fit memory; it never changes the result")
    p.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout batch")
    p.add_argument("--lr", type=float, help="peak learning rate, decayed linearly to 0. tldr default: the paper's "
                   "PPO rates (1.5e-5 at 1.3B, 7e-6 at 6.7B) extrapolated to the model size (4.5e-5 for 124M); "
                   "synth: 3e-5")
    p.add_argument("--gamma", type=float, default=1.0, help="discount")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip")
    p.add_argument("--clip-value", type=float, default=0.2, help="value clip")
    p.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    # evaluation, checkpoints
    p.add_argument("--eval-every", type=int, help="updates between temperature-0 samples of fixed validation posts")
    p.add_argument("--eval-n", type=int, help="validation posts summarized then (synth: judged by the gold labeler)")
    p.add_argument("--save-every", type=int, help="updates between ppo_step<N>.pt checkpoints (and the resume state)")
    add_run_args(p, "ppo", compile=False)
    args = p.parse_args(argv)
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
    return args


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


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = distributed.setup(args.device)  # the process group too, under torchrun
    dtype = pick_dtype(device, args.dtype)
    task = data.TASKS[args.task]
    enc = data.get_tokenizer(task["tokenizer"])
    pad, eos, R = data.pad_id(enc), enc.eot_token, task["response_len"]

    policy, ref, value, rm = build_models(args, enc, device)
    args.lr = args.lr or paper_lr("ppo", policy.num_params())
    optimizer = configure_optimizers(torch.nn.ModuleList([policy, value]), args.lr, device_type=device.type)
    # Training forwards go through DDP under torchrun, which averages the gradients of policy and value.
    train_policy, train_value = distributed.wrap(policy, device), distributed.wrap(value, device)
    kl_ctl = AdaptiveKL(args.beta, args.target_kl, args.kl_horizon) if args.target_kl else None

    # prompts: the SFT training posts, reshuffled every pass; fixed validation posts for the periodic samples
    train_records = data.load_split(args.task, "train", args.data_dir)
    with distributed.main_first():  # rank 0 writes the tokenized cache, the others read it
        queries = data.prepare_sft(train_records, enc, task["query_len"], R, args.cache_dir)["query"]
    valid_records = data.load_split(args.task, "valid", args.data_dir)[:args.eval_n]
    n_updates = args.episodes // args.rollout_batch_size
    update, log_mode = 0, "w"
    rank, world = distributed.rank(), distributed.world_size()
    gen = torch.Generator(device=device).manual_seed(args.seed + rank)  # each process samples its own responses
    resume_path = out / "ppo.resume.pt"
    if args.resume:
        state = load_resume_state(resume_path, policy, optimizer, "ppo")
        value.load_state_dict(state["value"])
        generators = state.get("generators", [state["generator"]])  # one per process under torchrun
        if len(generators) == world:
            gen.set_state(generators[rank])
        else:  # another number of processes than before: fresh streams, distinct per process and update
            gen.manual_seed(args.seed + rank + 1000 * state["step"])
        update, log_mode = state["step"], "a"
        if kl_ctl:
            kl_ctl.beta = state["beta"]
    print(f"ppo: {args.task}, policy {policy.num_params():,} parameters, {n_updates} updates of "
          f"{args.rollout_batch_size} episodes, lr {args.lr:.2e}, beta {args.beta}"
          + (f" (adaptive, target KL {args.target_kl})" if kl_ctl else "") + f", {device} {dtype}"
          + (f", {world} processes" if world > 1 else ""))

    def evaluate():
        """Temperature-0 summaries of the fixed validation posts; for synth the gold preference over references.
        Under torchrun each process summarizes its shard of the posts and every process gets all the summaries."""
        policy.eval()
        mine = valid_records[distributed.shard(len(valid_records))]
        texts = distributed.gather(data.summarize(policy, mine, enc, args.task, 0.0, args.micro_batch_size, device,
                                                  dtype))
        policy.train()
        row = dict(samples=[dict(reference=data.as_response(r["summary"]), policy=t)
                            for r, t in zip(valid_records[:3], texts)])
        if args.task == "synth":
            import synth
            row["gold_win_rate"] = synth.gold_win_rate(valid_records, texts)
        return row

    def save(path, resume_state=False):
        """Rank 0 writes; every process calls this, since the resume state gathers each one's sampling generator."""
        meta = dict(stage="ppo", task=args.task, tokenizer=enc.name, args=args, step=update)
        if resume_state:  # plus what PPO adds: the value network, the sampling generator(s), the adaptive beta
            generators = distributed.gather([gen.get_state()])  # each process's own stream, to resume it
            extra = dict(generators=generators) if world > 1 else {}
            if distributed.is_main():
                save_resume_state(path, policy, optimizer, value=value.state_dict(), generator=gen.get_state(),
                                  beta=kl_ctl.beta if kl_ctl else args.beta, **extra, **meta)
        elif distributed.is_main():
            save_checkpoint(path, policy, **meta)

    log = open(out / "ppo.log.jsonl" if distributed.is_main() else os.devnull, log_mode)  # rank 0 logs
    t_start = time.time()
    if update == 0:  # the starting point, on the same posts as every later evaluation: the SFT policy itself
        start = evaluate()
        log.write(json.dumps(dict(update=0, **start)) + "\n")
        print(f"update 0/{n_updates} (the SFT policy)" + (f" | gold {start['gold_win_rate']:.3f}"
                                                           if "gold_win_rate" in start else ""))
    policy.train()
    value.train()
    while update < n_updates:
        t0 = time.time()
        beta = kl_ctl.beta if kl_ctl else args.beta
        lr = args.lr * (1 - update / n_updates)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = data.batch_indices(len(queries), args.rollout_batch_size, update, args.seed)
        mine = idx[distributed.shard(len(idx))]  # this process's share of the rollout batch
        q_all = torch.as_tensor(queries[mine], device=device).long()

        # rollout: sample, then score everything with no gradient, in micro-batches
        with torch.no_grad():
            rollout = []
            for mb in micro_batches(len(mine), args.micro_batch_size):
                q, _ = trim_padding(q_all[mb], pad)
                policy.eval()
                with autocast(device, dtype):
                    tokens = policy.generate(q, (q != pad).long(), max_new_tokens=R, temperature=args.temperature,
                                             eos_id=eos, pad_id=pad, generator=gen)
                policy.train()
                mask = (tokens != pad).long()
                resp_mask = mask[:, q.size(1):].float()
                with autocast(device, dtype):
                    logp = response_logprobs(policy, tokens, mask, q.size(1), args.temperature)
                    ref_logp = response_logprobs(ref, tokens, mask, q.size(1), args.temperature)
                    values = value(tokens, mask, head_from=q.size(1) - 1)[:, :-1].float()
                    score = reward_at_eos(rm, tokens, mask)
                has_eos = (tokens[:, q.size(1):] == eos).any(1)
                score = torch.where(has_eos, score, torch.full_like(score, args.no_eos_score))
                rollout.append(dict(tokens=tokens, mask=mask, n_query=q.size(1), resp_mask=resp_mask, logp=logp,
                                    ref_logp=ref_logp, values=values, score=score, has_eos=has_eos))
        cat = lambda k: torch.cat([r[k] for r in rollout])  # noqa: E731
        logp, ref_logp, values, score, resp_mask = (cat(k) for k in ("logp", "ref_logp", "values", "score",
                                                                      "resp_mask"))
        rewards, kl = shape_rewards(score, logp, ref_logp, resp_mask, beta)
        advantages, returns = gae(rewards, values, resp_mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, resp_mask, across_ranks=True)  # statistics of the global batch
        for i, r in enumerate(rollout):  # the per-token targets travel with their micro-batch
            rows = micro_batches(len(mine), args.micro_batch_size)[i]
            r.update(advantages=advantages[rows], returns=returns[rows])

        # PPO epochs. The first epoch goes through the micro-batches in rollout order, so its first minibatch
        # recomputes exactly the rollout's log-probs (ratio 1); later epochs shuffle. Under torchrun every process
        # draws the same order of its own micro-batches, and a minibatch is one slice of that order on each.
        stats, first_ratio = [], None
        micro_per_mini = max(1, args.minibatch_size // world // args.micro_batch_size)
        order = list(range(len(rollout)))
        for epoch in range(args.ppo_epochs):
            if epoch:
                order = np.random.default_rng([args.seed, update, epoch]).permutation(len(rollout)).tolist()
            for start in range(0, len(order), micro_per_mini):
                minibatch = order[start:start + micro_per_mini]
                for i in minibatch:
                    r = rollout[i]
                    skip = i != minibatch[-1]  # DDP averages the gradients once per minibatch, after its last part
                    with (distributed.no_sync(train_policy, skip), distributed.no_sync(train_value, skip),
                          autocast(device, dtype)):
                        new_logp, entropy = response_logprobs(train_policy, r["tokens"], r["mask"], r["n_query"],
                                                              args.temperature, with_entropy=True)
                        vpred = train_value(r["tokens"], r["mask"], head_from=r["n_query"] - 1)[:, :-1].float()
                    pg, clipfrac, approx_kl = policy_loss(new_logp, r["logp"], r["advantages"], r["resp_mask"],
                                                          args.clip)
                    vf, vf_clipfrac = value_loss(vpred, r["values"], r["returns"], r["resp_mask"], args.clip_value)
                    loss = pg + args.vf_coef * vf
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"update {update + 1}: the loss is {loss.item()}; stopping. The last "
                                                 f"good checkpoints are kept in {out}")
                    (loss / micro_per_mini).backward()
                    if first_ratio is None:
                        first_ratio = dict(ratio_max_dev=(new_logp - r["logp"]).abs().max().exp().item() - 1,
                                           approx_kl=approx_kl.item())
                    stats.append([pg.item(), vf.item(), clipfrac.item(), vf_clipfrac.item(), approx_kl.item(),
                                  masked_mean(entropy, r["resp_mask"]).item()])
                if args.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(policy.parameters()) + list(value.parameters()),
                                                   args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        update += 1
        kl_sum = kl.sum(1)
        pg, vf, clipfrac, vf_clipfrac, approx_kl, entropy = np.mean(stats, axis=0).tolist()
        row = dict(update=update, episodes=update * args.rollout_batch_size, score=score.mean().item(),
                   rlhf_reward=(score - beta * kl_sum).mean().item(), kl=kl_sum.mean().item(), beta=beta,
                   entropy=entropy, approx_kl=approx_kl, first_minibatch_approx_kl=first_ratio["approx_kl"],
                   first_minibatch_ratio_dev=first_ratio["ratio_max_dev"], clipfrac=clipfrac, policy_loss=pg,
                   value_loss=vf, value_clipfrac=vf_clipfrac,
                   explained_variance=explained_variance(values, returns, resp_mask, across_ranks=True),
                   length=resp_mask.sum(1).mean().item(), eos_fraction=cat("has_eos").float().mean().item(), lr=lr,
                   episodes_per_s=len(idx) / (time.time() - t0), elapsed=time.time() - t_start)
        # Under torchrun each process measured its equal share of the batch: the average is the batch's mean. Every
        # process gets it, so the adaptive beta stays the same everywhere.
        shared = ("score", "rlhf_reward", "kl", "entropy", "approx_kl", "first_minibatch_approx_kl",
                  "first_minibatch_ratio_dev", "clipfrac", "policy_loss", "value_loss", "value_clipfrac", "length",
                  "eos_fraction")
        row.update(zip(shared, distributed.mean_over_ranks([row[k] for k in shared])))
        if kl_ctl:
            kl_ctl.update(row["kl"], args.rollout_batch_size)
        if update % args.eval_every == 0 or update == n_updates:
            row.update(evaluate())
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"update {update}/{n_updates} | score {row['score']:.3f} | kl {row['kl']:.2f} | reward "
              f"{row['rlhf_reward']:.3f} | entropy {row['entropy']:.2f} | approx-kl {row['approx_kl']:.4f} (first "
              f"{row['first_minibatch_approx_kl']:.1e}) | clip {row['clipfrac']:.3f} | vf {row['value_loss']:.3f} ev "
              f"{row['explained_variance']:.2f} | len {row['length']:.1f} eos {row['eos_fraction']:.2f} | "
              f"{row['episodes_per_s']:.0f} ep/s" + (f" | gold {row['gold_win_rate']:.3f}"
                                                     if "gold_win_rate" in row else ""))
        for s in row.get("samples", [])[:2]:
            print(f"    ref:{s['reference']}\n    ppo:{s['policy']}")
        if update % args.save_every == 0:
            save(out / f"ppo_step{update}.pt")
        if update % args.save_every == 0 or update == args.stop_after:
            save(resume_path, resume_state=True)
        if update == args.stop_after and update < n_updates:
            print(f"ppo: stopped after update {update} (--stop-after); continue with --resume")
            return
    log.close()

    final = evaluate()
    if not distributed.is_main():
        return  # the metrics and files are rank 0's
    first = json.loads((out / "ppo.log.jsonl").read_text().splitlines()[0])
    if "gold_win_rate" in first:
        final["sft_gold_win_rate"] = first["gold_win_rate"]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    metrics = dict(updates=update, episodes=update * args.rollout_batch_size, kl=row["kl"], score=row["score"],
                   minutes=(time.time() - t_start) / 60, peak_memory_gb=peak,
                   **{k: v for k, v in final.items() if k != "samples"})
    save_checkpoint(out / "ppo.pt", policy, stage="ppo", task=args.task, tokenizer=enc.name, args=args, step=update,
                    metrics=metrics)
    (out / "ppo.json").write_text(json.dumps(metrics, indent=1) + "\n")
    resume_path.unlink(missing_ok=True)
    print("ppo: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    print(f"ppo: peak memory {peak:.2f} GB ({'CUDA max allocated' if device.type == 'cuda' else 'resident set'})")
    print(f"ppo: wrote {out / 'ppo.pt'}")


if __name__ == "__main__":
    try:
        main()
        distributed.finish()
    except (data.DataError, CheckpointError, FileNotFoundError, ConnectionError, ValueError, FloatingPointError) as e:
        sys.exit(f"ppo.py: error: {e}")
