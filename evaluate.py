"""
Stage 4: measure policies the way the paper did (its section 4), for any set of checkpoints.

    python evaluate.py                        # synth: out/synth/sft.pt and ppo.pt on 500 test posts, gold judge
    python evaluate.py --sweep out/synth/ppo_step*.pt          # plus the over-optimization curve (figure 5)
    python evaluate.py --data transfer        # synth: a subreddit and problems never trained on (section 4.2)
    python evaluate.py --task tldr --judge http --judge-model MODEL       # an LLM judge over an OpenAI-style API
    python evaluate.py --task tldr --data cnndm                           # transfer to news articles

Every policy writes summaries of the same posts at temperature 0; for each, and for the reference summaries:
  - preference over the reference by the judge, with one standard error, and length-controlled: a logistic
    regression of the preference on log(length / reference length), one intercept per policy and a shared slope,
    read at equal length (the paper's appendix F); the mean length in tokens beside it;
  - ROUGE-1/2/L F-measures against the reference; copying (section 4.4, footnote 9);
  - KL to the SFT policy, sum over tokens of log pi - log sft on the policy's own samples at --kl-temperature
    (PPO's 0.7: the KL its penalty sees); the reward model's score (normalized: training references average 0).
Then, where the checkpoints allow it:
  - best-of-N (figure 7): N SFT samples per post, the pick of the RM or of ROUGE-L against the reference, judged,
    against the KL of best-of-N to its sampling policy, log N - (N-1)/N;
  - over-optimization (figure 5): judged preference and RM score against KL for the --sweep checkpoints;
  - the RM against simple metrics (section 4.4): how often the RM, ROUGE-L, length, copying and log-probability
    under SFT pick the summary the labeler chose in held-out comparisons (synth: beside the labelers' own agreement);
  - synth: what the RM learned (section 4.3), on controlled edits of a perfect summary (synth.PERTURBATIONS).

Judges: gold (synth only: the rubric of synth.gold_score, exact, with its axes); rm:PATH (any reward checkpoint, e.g.
one trained on other comparisons: the "gold RM" setup of Gao et al. 2022); http (an LLM behind an OpenAI-compatible
chat-completions API; --judge-url / OPENAI_BASE_URL, --judge-model / JUDGE_MODEL, --judge-key / OPENAI_API_KEY).

Writes <out>/eval.json (every number), <out>/eval_samples.md (posts, references and every summary side by side) and,
when matplotlib is installed, <out>/eval_preference.png, eval_overoptimization.png and eval_best_of_n.png.
"""
import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import synth
from model import autocast, pick_dtype, response_logprobs, trim_padding
from support import distributed
from support.checkpoint import POLICY_STAGES, CheckpointError, load_checkpoint, model_from_checkpoint
from support.cli import (SEED_MAX, add_task_args, fill_task_defaults, nonnegative_float, nonnegative_int,
                         positive_float, positive_int, seed_int)
from support.eval_report import (held_out_comparisons, plot, reference_texts, report, samples_page,  # outputs, files
                                 source)
from support.files import atomic_write, run_lock
from support.http_judge import HTTPJudge, JudgeError, add_http_args

DEFAULTS = {
    "tldr": dict(n_posts=1000, batch_size=16, max_n=16, bon_posts=256, analysis_n=2000),
    "synth": dict(n_posts=500, batch_size=128, max_n=16, bon_posts=250, analysis_n=1000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p, "eval")
    p.add_argument("--policies", nargs="+", help="policy checkpoints (sft, ppo or dpo) to evaluate (default: "
                   "<out>/sft.pt and <out>/ppo.pt, those that exist); each is named by its file name")
    p.add_argument("--sft", help="the SFT policy: KL is measured to it, best-of-N samples it, log-probabilities "
                   "come from it (default: <out>/sft.pt; skipped when missing)")
    p.add_argument("--reward", help="the reward model whose scores are reported, which picks best-of-N and is "
                   "analyzed (default: <out>/reward.pt; skipped when missing)")
    p.add_argument("--judge", help="gold (synth), rm:PATH (a reward checkpoint) or http (an LLM judge). Default: "
                   "gold for synth; tldr has none: the only judge at hand, the reward model, is the one PPO was "
                   "trained against, and its verdict would be circular. The report says, policy by policy, whether "
                   "the judge is independent of it")
    p.add_argument("--data", default="test", choices=["test", "valid", "transfer", "cnndm"],
                   help="posts to summarize: a split, or transfer (tldr: CNN/DM articles, also called cnndm; "
                   "synth: the held-out subreddit)")
    p.add_argument("--n-posts", type=positive_int, help="posts to summarize (synth: 500, tldr: 1000)")
    p.add_argument("--batch-size", type=positive_int, help="sequences per forward pass (synth: 128, tldr: 16)")
    p.add_argument("--kl-temperature", type=positive_float, default=0.7, help="sampling temperature of the KL "
                   "estimate, more than 0: its log-probs divide the logits by it")
    p.add_argument("--sweep", nargs="*", default=[], help="checkpoints of one run or of several betas, for the "
                   "preference-against-KL curve (e.g. out/synth/ppo_step*.pt)")
    p.add_argument("--max-n", type=nonnegative_int, help="best-of-N for N = 1, 2, 4, ... up to this (0: skip; "
                   "synth 16)")
    p.add_argument("--bon-posts", type=positive_int, help="posts for best-of-N (synth: 250, tldr: 256)")
    p.add_argument("--bon-temperature", type=nonnegative_float, default=0.7, help="temperature of the best-of-N "
                   "samples (0: the most likely tokens, the same summary N times)")
    p.add_argument("--comparisons", nargs="*", help="held-out comparisons for the RM analysis (default synth: "
                   "<out>/comparisons/synth_valid.json; tldr: the valid splits of <data>/comparisons/*.json)")
    p.add_argument("--analysis-n", type=nonnegative_int, help="comparisons in the RM analysis (0: skip; synth: 1000, "
                   "tldr: 2000)")
    p.add_argument("--show", type=nonnegative_int, default=20, help="posts on the samples page")
    p.add_argument("--no-plots", action="store_true", help="do not draw PNGs even if matplotlib is installed")
    add_http_args(p)
    p.add_argument("--seed", type=seed_int, default=0, help=f"seed of every sample and of the http judge's A/B order "
                   f"(0 to {SEED_MAX})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype: auto = bf16 on GPUs that support it, fp32 otherwise")
    args = p.parse_args(argv)
    fill_task_defaults(args, DEFAULTS)
    if args.data == "cnndm":
        if args.task != "tldr":
            p.error("--data cnndm is the tldr task's transfer set; for synth use --data transfer")
        args.data = "transfer"
    out = Path(args.out_dir)
    args.policies = args.policies or [str(f) for f in (out / "sft.pt", out / "ppo.pt") if f.exists()]
    if not args.policies:
        p.error(f"no --policies given and neither {out / 'sft.pt'} nor {out / 'ppo.pt'} exists: train them first")
    for flag in ("sft", "reward"):  # only the defaults may be missing: a named one skipped would go unnoticed
        given = getattr(args, flag)
        if given is not None and not Path(given).is_file():
            p.error(f"--{flag} {given}: " + ("a directory, not a checkpoint file" if Path(given).is_dir()
                                             else "no such file"))
    args.sft = args.sft or str(out / "sft.pt")
    args.reward = args.reward or str(out / "reward.pt")
    if args.judge is None and args.task == "tldr":
        p.error(f"--task tldr needs a --judge: http (an LLM judge), or rm:PATH with a reward model the policies were "
                f"not trained against. The default {args.reward} trained the PPO policy, so its preference would "
                f"measure how well PPO optimized it, not how good the summaries are")
    args.judge = args.judge or "gold"
    if args.judge == "gold" and args.task != "synth":
        p.error("--judge gold exists only for the synthetic task; use rm:PATH or http")
    if not (args.judge in ("gold", "http") or args.judge.startswith("rm:")):
        p.error(f"--judge {args.judge!r}: expected gold, rm:PATH or http")
    return args


@dataclass
class Run:
    """What every measurement needs: the task, its tokenizer, and where and how to run the models."""
    task: str
    enc: object
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    seed: int


# ---------------------------------------------------------------------------------------------------------------------
# statistics

def mean_se(values):
    """Mean and one standard error (population std / sqrt(n)) of the finite values; for a preference (1 win, 0.5
    tie, 0 loss) without ties the error is sqrt(p (1 - p) / n). NaN (no verdict) is left out and not counted."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return dict(mean=None, stderr=None, n=0)
    return dict(mean=float(x.mean()), stderr=float(x.std() / math.sqrt(len(x))), n=int(len(x)))


def bon_kl(n):
    """KL of best-of-n sampling to the policy sampled, log n - (n - 1) / n (Stiennon et al. 2020, appendix G.3)."""
    return math.log(n) - (n - 1) / n


def length_controlled(wins, log_ratios, ridge=1e-4):
    """The paper's appendix F: a logistic regression of the preference over the reference on the log length ratio,
    one intercept per policy and a slope shared by all, fitted by Newton's method (ties are half a win, a soft
    label; a small ridge keeps it finite when the slope alone separates wins from losses). A policy's
    length-controlled preference is its predicted preference at equal length. wins, log_ratios: {policy: array}.
    A policy that never wins (always wins) has its intercept's maximum at -inf (+inf) whatever the slope: its
    value is 0 (1), and it is left out of the fit, where the ridge alone would split that infinity between its
    intercept and the shared slope (a policy that never won, always longer than the reference, read near 0.5).
    Returns ({policy: preference}, slope, {policy: why it has no value}); the slope is None where nothing fits it."""
    names = [n for n in wins if np.isfinite(wins[n]).any()]
    undefined = {n: "the judge gave no verdict on any of its summaries" for n in wins if n not in names}
    out = {n: float(np.nanmean(wins[n])) for n in names if np.nanmean(wins[n]) in (0.0, 1.0)}
    names = [n for n in names if n not in out]
    rows, y = [], []
    for k, name in enumerate(names):
        for w, x in zip(wins[name], log_ratios[name]):
            if np.isfinite(w):
                rows.append([float(j == k) for j in range(len(names))] + [x])
                y.append(w)
    X, y = np.array(rows).reshape(len(rows), len(names) + 1), np.array(y)
    if not names or np.linalg.matrix_rank(X) < X.shape[1]:  # no length varies within a policy: slope unknown
        undefined |= {n: "its length ratio to the reference never varies (nor any other policy's): the preference "
                      "at equal length is not measured" for n in names}
        return out, None, undefined
    theta = np.zeros(X.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-X @ theta))
        grad = X.T @ (p - y) + ridge * theta
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + ridge * np.eye(len(theta))
        step = np.linalg.solve(hessian, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    out |= {name: float(1 / (1 + math.exp(-theta[k]))) for k, name in enumerate(names)}
    return {n: out[n] for n in wins if n in out}, float(theta[-1]), undefined


def agreement(diff, choice):
    """How often a predictor picks the summary the labeler chose: diff = its value for summary 1 minus summary 0
    (higher predicts 1); a tie counts a half, NaN (not measurable) is left out. Returns mean_se."""
    diff = np.asarray(diff, dtype=float)
    right = np.where(diff == 0, 0.5, ((diff > 0) == (np.asarray(choice) == 1)).astype(float))
    return mean_se(np.where(np.isnan(diff), np.nan, right))


# ---------------------------------------------------------------------------------------------------------------------
# judges. prefer(records, texts, baselines) -> (N,): 1 where texts[i] is the better summary of records[i], 0 where
# baselines[i] is, 0.5 for a tie, NaN for no verdict (an http judge whose retries or budget ran out)

def verdicts(a, b, tol=1e-9):
    """1 where score a is higher, 0 where b is, 0.5 within tol."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.where(np.abs(a - b) <= tol, 0.5, (a > b).astype(float))


class Gold:
    """The synthetic task's rubric (synth.gold_score): exact, free, and with its axes."""
    name = "gold"

    def totals(self, records, texts):
        return np.array([synth.gold_score(r, t)["total"] for r, t in zip(records, texts)])

    def prefer(self, records, texts, baselines, ended=None):  # a cut summary is judged as the text it is
        return verdicts(self.totals(records, texts), self.totals(records, baselines))

    def axes(self, records, texts):
        scores = [synth.gold_score(r, t) for r, t in zip(records, texts)]
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


class RewardJudge:
    """A reward model as the judge: the summary it scores higher wins. Independent of a policy only when the policy
    was not trained against it (Gao et al. 2022 judge with a larger RM trained on the same labels)."""

    def __init__(self, path, run, rm=None):
        self.rm = rm if rm is not None else load_model(path, run, "reward")[0]
        self.run, self.name = run, f"rm:{path}"

    def prefer(self, records, texts, baselines, ended=None):
        """ended: which texts ended with an EOS; the others get PPO's score for that, -1 (data.score_summaries)."""
        r = self.run
        score = lambda t, e=None: data.score_summaries(self.rm, records, t, r.enc, r.task, r.batch_size,  # noqa
                                                       r.device, r.dtype, ended=e)
        return verdicts(score(texts, ended), score(baselines))


def independence(judge, checkpoint):
    """How independent a judge is of one policy: a PPO policy judged by the reward model it was trained against
    is circular (Gao et al. 2022: the proxy keeps rising while the true preference falls)."""
    if isinstance(judge, Gold):
        return "independent: the gold rubric, which no policy or reward model was trained on"
    if isinstance(judge, HTTPJudge):
        return "independent: an LLM judge, which no policy was trained against"
    trained_on = (checkpoint or {}).get("args", {}).get("reward")
    if checkpoint is None or trained_on is None:
        return "independent: this policy was not trained against a reward model"
    if Path(trained_on).resolve() == Path(judge.name.removeprefix("rm:")).resolve():
        return "NOT independent: this policy was trained against this very reward model"
    return f"independent of this policy only if {trained_on}, which it was trained against, was trained on other data"


def make_judge(args, run, rm=None):
    """The judge of --judge; rm is the --reward model, reused when the judge names the same file."""
    if args.judge == "gold":
        return Gold()
    if args.judge == "http":
        return HTTPJudge(args.judge_url, args.judge_model, args.judge_key, args.judge_timeout, args.judge_retries,
                         args.judge_budget, args.judge_workers, args.seed)
    path = args.judge.removeprefix("rm:")
    same = rm is not None and Path(path).resolve() == Path(args.reward).resolve()
    return RewardJudge(path, run, rm if same else None)


# ---------------------------------------------------------------------------------------------------------------------
# models: loading, sampling, scoring

def load_model(path, run, stages):
    ckpt = load_checkpoint(path, stage=stages, task=run.task, tokenizer=run.enc.name)
    # frozen: padded forwards of a model that never trains may take FlexAttention on a CPU (support/attention.py)
    return model_from_checkpoint(ckpt).to(run.device).eval().requires_grad_(False), ckpt


def policy_names(paths):
    """Each checkpoint's file name; the folder too where two share a name (out/a/ppo.pt, out/b/ppo.pt)."""
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


@torch.no_grad()
def sample(policy, records, run, temperature, copies=1, ref=None, desc=None):
    """`copies` summaries of each record (record-major) at a temperature. Batch b draws from its own generator,
    seeded by (seed, b), so the samples do not depend on what else ran before. Returns the texts, whether each
    ended with an EOS, and with `ref` each sample's log-ratio summed over its tokens, log pi(y|x) - log ref(y|x) at
    the same temperature: the sampled KL (else None)."""
    queries = np.repeat(data.encode_queries(records, run.enc, data.TASKS[run.task]["query_len"]), copies, axis=0)
    pad, eos, R = data.pad_id(run.enc), run.enc.eot_token, data.TASKS[run.task]["response_len"]
    tokens, kls = [torch.empty(0, R, dtype=torch.long)], [torch.empty(0)]
    batches = distributed.shard(math.ceil(len(queries) / run.batch_size))  # under torchrun: this process's batches
    for b in tqdm(range(batches.start, batches.stop), desc=desc, leave=False, disable=desc is None):
        i = b * run.batch_size
        q, _ = trim_padding(torch.as_tensor(queries[i:i + run.batch_size], device=run.device).long(), pad)
        gen = torch.Generator(device=run.device).manual_seed(run.seed * 1_000_003 + b)
        with autocast(run.device, run.dtype):
            out, logp = policy.generate(q, (q != pad).long(), R, temperature, eos, pad, gen, return_logprobs=True)
            if ref is not None:
                mask = (out != pad).long()
                ref_logp = response_logprobs(ref, out, mask, q.size(1), temperature).float()
                kls.append(((logp - ref_logp) * mask[:, q.size(1):]).sum(1).cpu())
        tokens.append(out[:, q.size(1):].cpu())
    tokens = torch.cat(tokens)
    texts = distributed.gather(data.decode_responses(run.enc, tokens))
    ended = distributed.gather((tokens == eos).any(1).numpy())
    return texts, ended, (distributed.gather(torch.cat(kls).numpy()) if ref is not None else None)


def greedy_summaries(policy, records, run, desc=None):
    """Temperature-0 summaries (data.summarize) and whether each ended with an EOS; under torchrun each process
    writes those of its batches, and every process gets them all, in order. Whole batches, so every summary is the
    one a single process writes."""
    batches = distributed.shard(math.ceil(len(records) / run.batch_size))
    mine = records[batches.start * run.batch_size:batches.stop * run.batch_size]
    texts, ended = (data.summarize(policy, mine, run.enc, run.task, 0.0, run.batch_size, run.device, run.dtype,
                                   desc=desc, with_ended=True) if mine else ([], np.zeros(0, dtype=bool)))
    return distributed.gather(texts), distributed.gather(ended)


@torch.no_grad()
def summary_logprobs(model, records, texts, run):
    """log p(summary | query) under a policy at temperature 1, summed over the summary's tokens and its EOS."""
    pad, out = data.pad_id(run.enc), []
    for tokens, n_query, _ in data.summary_batches(records, texts, run.enc, run.task, run.batch_size, run.device):
        with autocast(run.device, run.dtype):
            logp = response_logprobs(model, tokens, (tokens != pad).long(), n_query).float()
        out.append((logp * (tokens[:, n_query:] != pad)).sum(1).cpu())
    return torch.cat(out).numpy()


def token_lengths(texts, enc):
    return np.array([len(enc.encode_ordinary(data.as_response(t))) for t in texts])


# ---------------------------------------------------------------------------------------------------------------------
# the measurements

def describe(texts, records, refs, judge, run, rm=None, kl=None, ended=None):
    """One row of the main table for a set of summaries of records (ended: which ended with an EOS; None: all, as
    references do). Returns the row, the judge's verdicts and the summaries' lengths in tokens."""
    ended = np.ones(len(texts), dtype=bool) if ended is None else np.asarray(ended, dtype=bool)
    wins, lengths = judge.prefer(records, texts, refs, ended), token_lengths(texts, run.enc)
    row = dict(preference=mean_se(wins), length=mean_se(lengths), eos_fraction=float(ended.mean()),
               rouge=data.mean_rouge(texts, refs), copying=mean_se([data.copying(t, source(r))
                                                                    for t, r in zip(texts, records)]))
    if isinstance(judge, Gold):
        row["gold"] = judge.axes(records, texts)
    if rm is not None:
        row["rm_score"] = mean_se(data.score_summaries(rm, records, texts, run.enc, run.task, run.batch_size,
                                                       run.device, run.dtype, ended=ended))
    if kl is not None:
        row["kl"] = mean_se(kl)
    return row, wins, lengths


def measure(path, name, records, refs, judge, run, sft, rm, kl_temperature):
    """Temperature-0 summaries of the evaluation posts and the main table's row of one policy checkpoint."""
    policy, ckpt = load_model(path, run, POLICY_STAGES)
    texts, ended = greedy_summaries(policy, records, run, desc=f"{name}: summarizing")
    kl = sample(policy, records, run, kl_temperature, ref=sft, desc=f"{name}: KL")[2] if sft else None
    row, wins, lengths = describe(texts, records, refs, judge, run, rm, kl, ended)
    return (dict(path=str(path), stage=ckpt["stage"], step=ckpt["step"], judge=independence(judge, ckpt), **row),
            texts, wins, lengths)


def best_of_n(sft, rm, records, refs, judge, run, max_n, temperature):
    """Figure 7: max_n SFT samples per post, once; for N = 1, 2, 4, ... the pick among the first N by the RM or by
    ROUGE-L against the reference, judged against the reference. KL is the best-of-N formula."""
    texts, ended, _ = sample(sft, records, run, temperature, copies=max_n, desc=f"best-of-{max_n}: sampling")
    many = [r for r in records for _ in range(max_n)]
    scores = dict(rm=data.score_summaries(rm, many, texts, run.enc, run.task, run.batch_size, run.device, run.dtype,
                                          ended=ended),
                  rouge=np.array([data.rouge(t, ref)["rougeL"] for t, ref in zip(texts, np.repeat(refs, max_n))]))
    texts = np.array(texts, dtype=object).reshape(len(records), max_n)
    rm_scores, rouge_scores = (scores[k].reshape(len(records), max_n) for k in ("rm", "rouge"))
    curves, rows = {}, np.arange(len(records))
    for name, s in scores.items():
        s = s.reshape(len(records), max_n)
        curves[name], n = [], 1
        while n <= max_n:
            pick = s[:, :n].argmax(1)
            chosen = list(texts[rows, pick])
            chosen_ended = ended.reshape(len(records), max_n)[rows, pick]
            curves[name].append(dict(n=n, kl=bon_kl(n), preference=mean_se(judge.prefer(records, chosen, refs,
                                                                                         chosen_ended)),
                                     rm_score=mean_se(rm_scores[rows, pick]),
                                     rougeL=float(rouge_scores[rows, pick].mean()),
                                     length=mean_se(token_lengths(chosen, run.enc))))
            if isinstance(judge, Gold):  # the gold score itself, for Gao et al.'s fits (tools/findings.py)
                curves[name][-1]["gold"] = mean_se(judge.totals(records, chosen))
            n *= 2
    return curves


def rm_analysis(comps, rm, rm_ckpt, sft, refs_by_id, run):
    """Section 4.4: agreement with the labelers' choices of the RM and of simple metrics, on the same held-out
    pairs. For synth also the labelers' agreement with each other there (the ceiling), and the length bias: how
    often the RM, the labelers and the gold rubric prefer the longer summary. A pair with a summary longer than the
    reward model reads is dropped and counted, as reward.py drops it (data.prepare_comparisons)."""
    spec = data.TASKS[run.task]
    kept = data.prepare_comparisons(comps, run.enc, spec["query_len"], spec["rm_response_len"])["index"]
    dropped, comps = len(comps) - len(kept), [comps[i] for i in kept]
    if dropped:
        print(f"evaluate: RM analysis: dropped {dropped} of {dropped + len(comps)} comparisons with a summary longer "
              f"than the reward model reads ({spec['rm_response_len']} tokens with the EOS), as reward.py does")
    if not comps:
        return dict(n=0, dropped_long=dropped, agreement={}, prefers_longer={})
    s0, s1 = [c["summaries"][0] for c in comps], [c["summaries"][1] for c in comps]
    choice = np.array([c["choice"] for c in comps])
    refs = [refs_by_id.get(c["id"]) for c in comps]
    rouge = lambda texts: np.array([data.rouge(t, f)["rougeL"] if f else np.nan for t, f in zip(texts, refs)])  # noqa
    length = token_lengths(s1, run.enc) - token_lengths(s0, run.enc)
    diffs = {"ROUGE-L": rouge(s1) - rouge(s0), "length": length,
             "copying": np.array([data.copying(b, source(c)) - data.copying(a, source(c))
                                  for a, b, c in zip(s0, s1, comps)])}
    if rm is not None:
        score = lambda texts: data.score_summaries(rm, comps, texts, run.enc, run.task, run.batch_size,  # noqa
                                                   run.device, run.dtype)
        diffs["reward model"] = score(s1) - score(s0)
    if sft is not None:
        diffs["log-prob under SFT"] = summary_logprobs(sft, comps, s1, run) - summary_logprobs(sft, comps, s0, run)
    out = dict(n=len(comps), dropped_long=dropped, agreement={k: agreement(d, choice) for k, d in diffs.items()})
    longer = np.sign(length) != 0
    out["prefers_longer"] = dict(labelers=mean_se(((choice == 1) == (length > 0))[longer]), n=int(longer.sum()))
    if rm is not None:
        out["prefers_longer"]["reward model"] = mean_se(((diffs["reward model"] > 0) == (length > 0))[longer])
    if run.task == "synth":
        rm_args = rm_ckpt["args"] if rm_ckpt else {}
        labelers = synth.make_labelers(rm_args.get("labelers", 10), seed=rm_args.get("seed", 0))
        p, se = synth.second_opinion_agreement(comps, labelers, random.Random(run.seed))
        out["agreement"]["labelers (second opinion)"] = dict(mean=p, stderr=se, n=len(comps))
        gold = Gold().prefer(comps, s1, s0)
        out["agreement"]["gold rubric"] = agreement(gold - 0.5, choice)
        out["prefers_longer"]["gold rubric"] = mean_se(np.where(length > 0, gold, 1 - gold)[longer])
    return out


def probes(records, rm, run):
    """Section 4.3 in miniature: the RM and the gold rubric on a perfect summary against one edit of it. Returns
    {edit: {rm_prefers_original, gold_prefers_original, rm_drop}}; 'longer' is the length bias (gold is indifferent
    to the long form within its budget: a length-biased RM prefers it)."""
    rng = random.Random(run.seed)
    perfect = [synth.perfect_summary(r) for r in records]
    score = lambda texts: data.score_summaries(rm, records, texts, run.enc, run.task, run.batch_size,  # noqa
                                               run.device, run.dtype)
    base, gold = score(perfect), Gold()
    out = {}
    for kind in synth.PERTURBATIONS:
        edited = [synth.perturb_summary(r, kind, rng) for r in records]
        r_edit = score(edited)
        out[kind] = dict(rm_prefers_original=mean_se(verdicts(base, r_edit)),
                         gold_prefers_original=mean_se(gold.prefer(records, perfect, edited)),
                         rm_drop=mean_se(base - r_edit))
    return out


# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    with run_lock(args.out_dir, "evaluate"):  # one run per out-dir: a second would mix its files with this one's
        evaluate(args)


def evaluate(args):
    t_start = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.setup(args.device)  # and the process group, under torchrun
    run = Run(args.task, data.get_tokenizer(data.TASKS[args.task]["tokenizer"]), args.batch_size, device,
              pick_dtype(device, args.dtype), args.seed)
    torch.manual_seed(args.seed)
    records = data.load_split(args.task, args.data, args.data_dir)[:args.n_posts]
    refs = [data.as_response(r["summary"]) for r in records]
    sft = load_model(args.sft, run, "sft")[0] if Path(args.sft).is_file() else None
    rm, rm_ckpt = load_model(args.reward, run, "reward") if Path(args.reward).is_file() else (None, None)
    for missing, path, what in ((sft is None, args.sft, "KL, best-of-N and SFT log-probabilities"),
                                (rm is None, args.reward, "RM scores, best-of-N and the RM analysis")):
        if missing:
            print(f"evaluate: no checkpoint at {path}: {what} skipped")
    judge = make_judge(args, run, rm)
    results = dict(task=args.task, data=args.data, n=len(records), judge=judge.name, policies={})
    print(f"evaluate: {len(args.policies)} policies on {len(records)} {args.data} posts of {args.task}, judge "
          f"{judge.name}, {device} {run.dtype}")

    # the main table (figure 1): the references, then each policy
    texts, wins, lengths = {"reference": refs}, {}, {}
    results["policies"]["reference"], wins["reference"], lengths["reference"] = describe(refs, records, refs, judge,
                                                                                          run, rm)
    setting = (records, refs, judge, run, sft, rm, args.kl_temperature)  # what every measured policy shares
    for name, path in zip(policy_names(args.policies), args.policies):
        results["policies"][name], texts[name], wins[name], lengths[name] = measure(path, name, *setting)
    log_ratio = {n: np.log(np.maximum(lengths[n], 1) / np.maximum(lengths["reference"], 1)) for n in wins}
    lc, slope, undefined = length_controlled({n: w for n, w in wins.items() if n != "reference"}, log_ratio)
    results["length_controlled"] = dict(preference=lc, slope_per_log_length_ratio=slope, undefined=undefined)
    for name, why in undefined.items():
        print(f"evaluate: no length-controlled preference for {name}: {why}")

    if args.sweep:  # figure 5: one run's checkpoints or several betas, against their KL to SFT
        if sft is None:
            raise CheckpointError(f"--sweep needs the SFT policy to measure KL: {args.sft} does not exist")
        points = [args.sft] + [p for p in args.sweep if Path(p).resolve() != Path(args.sft).resolve()]
        rows = [measure(p, n, *setting)[0] | dict(name=n) for n, p in zip(policy_names(points), points)]
        results["sweep"] = sorted(({k: v for k, v in row.items() if k not in ("rouge", "copying")} for row in rows),
                                  key=lambda r: r["kl"]["mean"])
    if args.max_n and sft is not None and rm is not None:  # figure 7
        n_bon = min(args.bon_posts, len(records))
        results["best_of_n"] = best_of_n(sft, rm, records[:n_bon], refs[:n_bon], judge, run, args.max_n,
                                         args.bon_temperature)
    comps = held_out_comparisons(args)
    if comps:  # section 4.4
        results["rm_analysis"] = rm_analysis(comps, rm, rm_ckpt, sft, reference_texts(args.task, args.data_dir), run)
    if args.task == "synth" and rm is not None:  # section 4.3
        results["probes"] = probes(records, rm, run)
    if isinstance(judge, HTTPJudge):
        results["judge_stats"] = judge.stats
    results["args"] = {k: v for k, v in vars(args).items() if k != "judge_key"}
    results["minutes"] = (time.time() - t_start) / 60

    if not distributed.is_main():
        return  # every process computed the same results; one writes them
    atomic_write(out / "eval.json", json.dumps(results, indent=1) + "\n")
    atomic_write(out / "eval_samples.md", samples_page(results, records, texts, lengths, wins, args.show))
    pictures = [] if args.no_plots else plot(results, out)
    report(results)
    print(f"evaluate: wrote {out / 'eval.json'}, {out / 'eval_samples.md'}"
          + "".join(f", {p}" for p in pictures) + f" in {results['minutes']:.1f} min")


if __name__ == "__main__":
    try:
        main()
        distributed.finish()
    except (data.DataError, CheckpointError, JudgeError, OSError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
