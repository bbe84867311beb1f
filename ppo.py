"""
Stage 3: PPO against the reward model, with a KL penalty to the SFT policy (paper section 3.4).

    python ppo.py --task synth               # the synthetic TL;DR on a CPU, minutes
    python ppo.py --task tldr --beta 0.05    # the paper's setting, one GPU
    python ppo.py --estimator rloo           # RLOO: 4 samples a prompt, no value network

The policy and the reference start from sft.pt; the value network is a separate copy of the reward
model (its normalization bias included); the reward model is frozen. Each update (the loop in run):
sample responses to training posts at temperature 0.7, score them, shape the reward (the RM score
at the end, -beta * (log pi - log ref) on every token), estimate advantages by GAE (another estimate
replaces estimate_advantages; --estimator rloo is RLOO, without a value network: rloo_advantages
says what changes), and take 4 epochs of clipped PPO steps on policy and value. The
functions that teach are one-process code: under torchrun each process samples its share of the
episodes, the loop gathers them, and one call sums the gradients.

Conventions (each tested in tests/test_ppo.py):
- Responses have a fixed length with EOS allowed; tokens after the first EOS are PAD; a response
  without EOS gets the fixed score --no-eos-score instead of the RM's.
- The score lands on the response's last real token: its EOS (index 2 of [t0, t1, EOS, PAD, PAD]).
- The same temperature divides the logits when sampling and in every log-prob forward, so the first
  minibatch of each update sees ratio exactly 1 and approx-KL 0: the old log-probs come from the
  same forward, in the same micro-batches, as that first minibatch.
- GAE with gamma 1, lambda 0.95; advantages whitened over the batch's real tokens; means are masked.
- Each episode samples with the noise of its own seed, and the losses are token means over the
  whole minibatch whose episodes are reshuffled every epoch, so --micro-batch-size,
  --sample-batch-size and the number of torchrun processes change the result only by float rounding.

Writes <out>/ppo.pt (the policy), <out>/ppo_step<N>.pt every --save-every updates (read a KL sweep
off one run), <out>/ppo.json, <out>/ppo.log.jsonl (one line per update).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
from model import autocast, response_logprobs, reward_at_eos, row_noise, trim_padding
from support import distributed
from support.checkpoint import CheckpointError, stop_if_not_finite
from support.cli import (add_run_args, add_task_args, finite_float, fraction, nonnegative_float,
                         positive_float, positive_int)
from support.files import run_lock
from support.optim import configure_optimizers, optimizer_step
from support.ppo_run import (build_models, complete_args, episodes_sampled_at_once, evaluate_policy,
                             finish, load_prompts, log_the_sft_policy, print_row, print_start,
                             resume, resume_inputs, save_checkpoints, setup, tldr_lr, update_row)
from support.steplog import StepLog

# tldr follows the paper and Huang et al. (2024): 512 episodes per update, 4 epochs, ~1M episodes,
# lr by model size. synth is sized for a 2-core CPU and was chosen by measurement (see docs/results.md).
DEFAULTS = {
    "tldr": dict(beta=0.05, episodes=1_000_000, rollout_batch_size=512, minibatch_size=64, micro_batch_size=16,
                 lr=None, eval_every=10, eval_n=256, save_every=100),
    "synth": dict(beta=0.1, episodes=3200, rollout_batch_size=64, minibatch_size=16, micro_batch_size=16,
                  lr=6e-5, eval_every=10, eval_n=250, save_every=10),
}


# ------------------------------------------------------------------------------------------------
# the RLHF math: small pure functions, each tested against a hand-computed example

def masked_mean(x, mask, n=None):
    """Mean of x over the positions where mask is 1 (same shapes). n, when given, replaces the count
    of those positions: a micro-batch divides by its whole minibatch's count, so that micro-batches
    add up to its mean."""
    return (x * mask).sum() / (mask.sum() if n is None else n)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked positions; masked-out positions come back 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def shape_rewards(score, logp, ref_logp, mask, beta):
    """Per-token rewards of the paper's R(x, y) = r(x, y) - beta * log(pi(y|x) / ref(y|x)). score
    (B,), logp / ref_logp / mask (B, R). Returns rewards and the per-token KL estimate (B, R): every
    real token pays -beta * (logp - ref_logp); the score lands on the last real token (the EOS)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = mask.sum(1).long() - 1  # (B,): index of the EOS, or of the last token when there is none
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation over response tokens. rewards, values, mask: (B, R); a
    masked position ends the episode (its value and advantage are 0). Returns advantages and
    returns (B, R)."""
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


def rloo_advantages(rewards, mask, k):
    """RLOO (Ahmadian et al. 2024), the one alternative to GAE here (--estimator rloo). What changes from PPO:
    each prompt is sampled k times (its samples adjacent in the batch), and a sample's advantage is its whole
    reward R, the score minus the KL penalty of all its tokens (rewards summed), less the mean R of the prompt's
    other k - 1 samples; every token of the sample gets that advantage. No value network: nothing to train, score
    or hold in memory besides policy, reference and reward model. What does not: sampling, the KL penalty in the
    reward, whitening, the clipped policy loss over 4 epochs, every convention above. Returns (B, R)."""
    R = rewards.sum(1).view(-1, k)  # (prompts, k)
    baseline = (R.sum(1, keepdim=True) - R) / (k - 1)  # leave one out
    return (R - baseline).reshape(-1, 1) * mask


def policy_loss(logp, old_logp, advantages, mask, clip=0.2, n=None):
    """PPO's clipped surrogate (Schulman et al. 2017), masked. All (B, R); n as in masked_mean.
    Returns the loss, the fraction of tokens where the clip was active, and approx-KL
    0.5 * E[(log ratio)^2] (0 when the policy has not moved)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipfrac = masked_mean((torch.abs(ratio - 1) > clip).float(), mask, n)
    return masked_mean(losses, mask, n), clipfrac, masked_mean(0.5 * log_ratio ** 2, mask, n)


def value_loss(values, old_values, returns, mask, clip=0.2, n=None):
    """Clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within clip of the
    rollout's value. All (B, R); n as in masked_mean. Returns the loss and the fraction of tokens
    where clipping bound."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask, n)
    return 0.5 * masked_mean(losses, mask, n), clipfrac


class AdaptiveKL:
    """Ziegler et al. (2019)'s controller: beta moves so the KL tracks a target, by at most 20% of
    n_steps/horizon per update: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, beta, target, horizon=10_000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_steps):
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


# ------------------------------------------------------------------------------------------------
# one update: a rollout, the advantages, then the PPO epochs

def episode_tokens(query, response, pad):
    """Episodes as one (B, T) sequence each: the queries' common left padding trimmed, then the
    (B, R) responses. Returns the tokens, their mask and the query length."""
    q, _ = trim_padding(query, pad)
    tokens = torch.cat([q, response], 1)
    return tokens, (tokens != pad).long(), q.size(1)


def value_estimates(value, tokens, mask, n_query):
    """(B, R) fp32: the value of response token t, read where its log-prob is read, at the position
    before t. That position has seen the query and the tokens before t: the state in which t is
    chosen, so the value there estimates the return from that choice on. head_from=n_query - 1
    starts at the last query token; [:, :-1] drops the state after the last token (no choice)."""
    return value(tokens, mask, head_from=n_query - 1)[:, :-1].float()


@torch.no_grad()
def rollout(policy, ref, value, rm, queries, seeds, args, pad, eos, device, dtype):
    """Section 3.4's episodes for (N, Lq) left-padded queries: responses sampled, each from its own
    seed; then, in training's micro-batches, their log-probs under policy and reference, the values
    and the RM's score. Returns per-episode CPU tensors and the time taken."""
    R, T, t0 = data.TASKS[args.task]["response_len"], args.temperature, time.time()
    policy.eval()
    responses = []
    for sb in micro_batches(len(queries), args.sample_batch_size):
        q = queries[sb] if args.compile else trim_padding(queries[sb], pad)[0]  # compile: one shape
        with autocast(device, dtype):
            tokens = policy.generate(q, (q != pad).long(), R, T, eos, pad,
                                     noise=row_noise(seeds[sb], R).to(device), compile=args.compile)
        responses.append(tokens[:, q.size(1):])
    policy.train()
    response = torch.cat(responses).cpu()
    t1 = time.time()
    scored = []
    for mb in micro_batches(len(queries), args.micro_batch_size):
        tokens, mask, n_query = episode_tokens(queries[mb], response[mb].to(device), pad)
        with autocast(device, dtype):
            scored.append(dict(logp=response_logprobs(policy, tokens, mask, n_query, T),
                               ref_logp=response_logprobs(ref, tokens, mask, n_query, T),
                               score=reward_at_eos(rm, tokens, mask, eos, args.no_eos_score)))
            if value is not None:  # RLOO has none
                scored[-1]["values"] = value_estimates(value, tokens, mask, n_query)
    batch = {k: torch.cat([s[k] for s in scored]).cpu() for k in scored[0]}
    batch.update(query=queries.cpu(), response=response, has_eos=(response == eos).any(1),
                 resp_mask=(response != pad).float())
    return batch, dict(sampling_s=t1 - t0, scoring_s=time.time() - t1)


def estimate_advantages(rewards, batch, args):
    """The one place an advantage estimate lives (tests/test_forks.py swaps in REINFORCE with a
    baseline). The paper's: GAE over the value network's estimates; or RLOO's leave-one-out
    baseline. Returns the advantages (B, R) and the value network's targets (B, R), or None: no
    value network is trained."""
    if args.estimator == "rloo":
        return rloo_advantages(rewards, batch["resp_mask"], args.samples_per_prompt), None
    return gae(rewards, batch["values"], batch["resp_mask"], args.gamma, args.lam)


def add_advantages(batch, beta, args):
    """Adds to the batch the per-token KL, the advantages (whitened over its real tokens) and the
    value targets. The paper's reward: the score at the EOS, the KL penalty on every token."""
    rewards, batch["kl"] = shape_rewards(batch["score"], batch["logp"], batch["ref_logp"],
                                         batch["resp_mask"], beta)
    adv, returns = estimate_advantages(rewards, batch, args)
    if returns is not None:
        batch["returns"] = returns
    batch["advantages"] = masked_whiten(adv, batch["resp_mask"])
    return batch


def minibatches(batch, update, args):
    """--ppo-epochs passes over the batch: the first in the rollout's order (its first minibatch
    replays the forwards that scored it: ratio 1), later ones reshuffled. Yields each minibatch's
    episodes that this process trains (under torchrun its part) and its count of real tokens."""
    n = len(batch["score"])
    for epoch in range(args.ppo_epochs):
        order = (np.arange(n) if epoch == 0
                 else np.random.default_rng([args.seed, update, epoch]).permutation(n))
        for start in range(0, n, args.minibatch_size):
            minibatch = order[start:start + args.minibatch_size]
            n_tokens = batch["resp_mask"][minibatch].sum().item()  # every token mean's denominator
            yield minibatch[distributed.shard(len(minibatch))], n_tokens


def ppo_losses(policy, value, ep, n_tokens, args, pad, device, dtype):
    """A micro-batch's policy loss plus --vf-coef x value loss (none without value targets), over
    n_tokens, the minibatch's count: micro-batches add up to its token mean. Returns the loss, its
    statistics and the new log-probs."""
    tokens, mask, n_query = episode_tokens(ep["query"], ep["response"], pad)
    m = ep["resp_mask"]
    with autocast(device, dtype):
        logp, entropy = response_logprobs(policy, tokens, mask, n_query, args.temperature,
                                          with_entropy=True)
    pg, clipfrac, approx_kl = policy_loss(logp, ep["logp"], ep["advantages"], m, args.clip,
                                          n_tokens)
    stats = dict(policy_loss=pg, clipfrac=clipfrac, approx_kl=approx_kl,
                 entropy=masked_mean(entropy.detach(), m, n_tokens))
    if "returns" not in ep:
        return pg, stats, logp
    with autocast(device, dtype):
        values = value_estimates(value, tokens, mask, n_query)
    vf, vf_clipfrac = value_loss(values, ep["values"], ep["returns"], m, args.clip_value, n_tokens)
    return pg + args.vf_coef * vf, dict(stats, value_loss=vf, value_clipfrac=vf_clipfrac), logp


def ppo_update(policy, value, optimizer, batch, lr, update, args, pad, device, dtype):
    """The clipped PPO epochs: one optimizer step per minibatch. Returns the statistics, means over
    the minibatches, and the first micro-batch's check that it replays the rollout (0 unless
    compiled)."""
    params = [p for model in (policy, value) if model is not None for p in model.parameters()]
    totals, first, n_steps = {}, None, 0
    resume_path = Path(args.out_dir) / "ppo.resume.pt"  # kept if a loss is not finite
    for episodes, n_tokens in minibatches(batch, update, args):
        for mb in micro_batches(len(episodes), args.micro_batch_size):
            ep = {k: v[episodes[mb]].to(device) for k, v in batch.items()}
            loss, stats, logp = ppo_losses(policy, value, ep, n_tokens, args, pad, device, dtype)
            stop_if_not_finite(loss.detach(), f"update {update + 1}", resume_path)
            loss.backward()
            if first is None:
                log_ratio = logp.detach() - ep["logp"]
                first = dict(first_minibatch_ratio_dev=log_ratio.abs().max().exp().item() - 1,
                             first_minibatch_approx_kl=masked_mean(0.5 * log_ratio ** 2,
                                                                   ep["resp_mask"]).item())
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v.item()
        distributed.sum_gradients(params)  # under torchrun: the whole minibatch's gradient
        optimizer_step(optimizer, params, lr, args.grad_clip)
        n_steps += 1
    return dict({k: v / n_steps for k, v in totals.items()}, **first)


# ------------------------------------------------------------------------------------------------
# the loop

def main(argv=None):
    args = parse_args(argv)
    with run_lock(args.out_dir, "ppo"):  # one run per out-dir: a second would mix their files
        run(args)


def run(args):
    out, device, dtype, enc = setup(args)  # the seed, the device; under torchrun the process group
    pad, eos = data.pad_id(enc), enc.eot_token
    policy, ref, value, rm = build_models(args, enc, device)
    inputs = resume_inputs(args)  # what a resume must find unchanged: the models and the posts
    if args.lr is None:  # tldr: by model size (0 is refused by --lr's type, never read as unset)
        args.lr = tldr_lr(policy.num_params())
    optimizer = configure_optimizers(torch.nn.ModuleList([m for m in (policy, value) if m is not None]),
                                     args.lr, device_type=device.type)
    train_policy, train_value = policy, value  # what the training forwards run: compiled, or not
    if args.compile:
        train_policy = torch.compile(policy)
        train_value = torch.compile(value) if value is not None else None
    kl_ctl = AdaptiveKL(args.beta, args.target_kl, args.kl_horizon) if args.target_kl else None
    # prompts: the SFT training posts, reshuffled every pass; fixed validation posts for evaluation
    queries, valid_records = load_prompts(args, enc)
    n_updates = args.episodes // args.rollout_batch_size
    args.sample_batch_size = episodes_sampled_at_once(args, policy, device, dtype)
    update = resume(out, policy, value, optimizer, kl_ctl, args, inputs) if args.resume else 0
    print_start(args, policy, n_updates, kl_ctl, device, dtype)

    log = StepLog(out / "ppo.log.jsonl", resume_step=update if args.resume else None, key="update")
    t_start = time.time()
    if update == 0:  # the starting point, on the same posts as every later evaluation
        log_the_sft_policy(log, policy, valid_records, enc, args, device, dtype, n_updates)
    while update < n_updates:
        beta = kl_ctl.beta if kl_ctl else args.beta
        lr = args.lr * (1 - update / n_updates)  # linear decay to 0
        # the update's prompts; RLOO samples each --samples-per-prompt times (adjacent), PPO once
        idx = np.repeat(data.batch_indices(len(queries), args.rollout_batch_size // args.samples_per_prompt,
                                           update, args.seed), args.samples_per_prompt)
        seeds = episode_seeds(args.seed, update, len(idx))
        mine = my_episodes(len(idx), args.minibatch_size)  # all of them, but under torchrun
        prompts = torch.as_tensor(queries[idx[mine]], device=device).long()
        batch, seconds = rollout(policy, ref, value, rm, prompts, [seeds[e] for e in mine], args, pad,
                                 eos, device, dtype)
        batch = add_advantages(distributed.gather_rows(batch, mine), beta, args)  # torchrun: all's
        t0 = time.time()
        stats = ppo_update(train_policy, train_value, optimizer, batch, lr, update, args, pad, device,
                           dtype)
        seconds["training_s"] = time.time() - t0
        update += 1
        row = update_row(update, batch, stats, beta, lr, args, seconds, t_start)
        if kl_ctl:
            kl_ctl.update(row["kl"], args.rollout_batch_size)
        if update % args.eval_every == 0 or update == n_updates:
            row.update(evaluate_policy(policy, valid_records, enc, args, device, dtype))
        log.write(row)
        print_row(row, n_updates)
        save_checkpoints(out, update, policy, value, optimizer, kl_ctl, inputs, enc, args)
        if update == args.stop_after and update < n_updates:
            print(f"ppo: stopped after update {update} (--stop-after); continue with --resume")
            return
    log.close()

    final = evaluate_policy(policy, valid_records, enc, args, device, dtype,
                            desc="ppo: final validation summaries")
    if distributed.is_main():  # the metrics and files are rank 0's
        finish(policy, final, args, enc, out, update, t_start, device)


# ------------------------------------------------------------------------------------------------
# setup: the flags, the episodes' seeds, this process's share

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p, "ppo")
    p.add_argument("--sft", help="policy and reference (default: <out>/sft.pt)")
    p.add_argument("--reward", help="reward model, the value network's start (default: <out>/reward.pt)")
    # the objective
    p.add_argument("--beta", type=nonnegative_float, help="KL penalty coefficient; 0: no penalty. tldr: 0.05, the "
                   "paper's; synth: 0.1, where at 0.05 some seeds and machines find the reward model's blind spots "
                   "(false sentences it scores up) and others do not")
    p.add_argument("--target-kl", type=positive_float, help="adapt beta so the KL per response "
                   "tracks this many nats (Ziegler et al. 2019); off by default: beta stays fixed")
    p.add_argument("--kl-horizon", type=positive_int, default=10_000,
                   help="episodes over which the adaptive beta can move")
    p.add_argument("--no-eos-score", type=finite_float, default=-1.0,
                   help="the score of a response without EOS")
    p.add_argument("--temperature", type=positive_float, default=0.7, help="sampling temperature, "
                   "more than 0: every log-prob forward divides the logits by it too")
    # PPO
    p.add_argument("--episodes", type=positive_int, help="responses sampled in all, a multiple of "
                   "--rollout-batch-size (tldr: 1M, the paper's; synth: 3,200; the default is rounded "
                   "down to whole rollout batches, e.g. 999,936 at 512)")
    p.add_argument("--rollout-batch-size", type=positive_int,
                   help="responses per update, over all processes under torchrun (tldr: 512)")
    p.add_argument("--minibatch-size", type=positive_int,
                   help="responses per optimizer step within an update, over all processes")
    p.add_argument("--micro-batch-size", type=positive_int, help="responses per forward pass in "
                   "each process (scoring, training): lower it to fit memory; it changes the result "
                   "only by float rounding")
    p.add_argument("--sample-batch-size", type=positive_int, help="responses sampled at once in each "
                   "process (default: as many as half a GPU's free memory holds, on a CPU the "
                   "process's share of the rollout batch); it changes the result only by rounding")
    p.add_argument("--ppo-epochs", type=positive_int, default=4, help="passes over each rollout batch")
    p.add_argument("--estimator", choices=["gae", "rloo"], default="gae", help="the advantage: gae (the paper: "
                   "GAE over a value network) or rloo (Ahmadian et al. 2024: each sample's reward less the mean of "
                   "its prompt's other samples; no value network, see rloo_advantages)")
    p.add_argument("--samples-per-prompt", type=positive_int, help="samples of each prompt in a rollout batch "
                   "(gae: 1; rloo: 4, at least 2); a divisor of --rollout-batch-size")
    p.add_argument("--lr", type=positive_float, help="peak learning rate, decayed linearly to 0. "
                   "tldr: the paper's PPO rates (1.5e-5 at 1.3B, 7e-6 at 6.7B) along their power law, "
                   "but never above 1.5e-5 (so 1.5e-5 for every GPT-2; see tldr_lr); synth: 6e-5")
    p.add_argument("--gamma", type=fraction, default=1.0, help="discount, 0 to 1")
    p.add_argument("--lam", type=fraction, default=0.95, help="GAE lambda, 0 to 1")
    p.add_argument("--clip", type=positive_float, default=0.2, help="policy ratio clip: the ratio "
                   "is clipped to 1 - this .. 1 + this, more than 0")
    p.add_argument("--clip-value", type=positive_float, default=0.2, help="value clip: a new value "
                   "is kept within this of the rollout's, more than 0")
    p.add_argument("--vf-coef", type=nonnegative_float, default=0.1, help="value loss weight")
    p.add_argument("--grad-clip", type=nonnegative_float, default=1.0,
                   help="clip the gradient norm (0: off)")
    # evaluation, checkpoints
    p.add_argument("--eval-every", type=positive_int,
                   help="updates between temperature-0 samples of fixed validation posts")
    p.add_argument("--eval-n", type=positive_int,
                   help="validation posts summarized then (synth: judged by the gold labeler)")
    p.add_argument("--save-every", type=positive_int,
                   help="updates between ppo_step<N>.pt checkpoints (and the resume state)")
    add_run_args(p, "ppo", compile="torch.compile the policy's one-token sampling step and the "
                 "training forwards of policy and value: faster on GPUs after a minute or two of "
                 "compiling. The first minibatch's ratio is then 1 up to float rounding, not exactly")
    return complete_args(p, p.parse_args(argv), DEFAULTS)


def micro_batches(n, size):
    return [slice(i, i + size) for i in range(0, n, size)]


def episode_seeds(seed, update, n):
    """A seed for each episode of an update, from (run seed, update, episode number): an episode's
    sample is the same whatever batch, micro-batch or process it is sampled in."""
    return [int(np.random.SeedSequence([seed, update, e]).generate_state(1)[0]) for e in range(n)]


def my_episodes(n, minibatch_size):
    """The episodes of a rollout batch of n that this process samples: its part (distributed.shard)
    of every minibatch of the first epoch, so that it trains its own samples first, in the
    micro-batches that scored them. One process: all of them, in order."""
    return np.concatenate([np.arange(k, k + minibatch_size)[distributed.shard(minibatch_size)]
                           for k in range(0, n, minibatch_size)])


if __name__ == "__main__":
    try:
        main()
        distributed.finish()
    except (data.DataError, CheckpointError, OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"ppo.py: error: {e}")
