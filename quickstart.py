"""
RLHF on a laptop: the whole loop of the paper on the synthetic TL;DR, in one command, on a CPU, in minutes.

    python quickstart.py             # data -> SFT -> reward model -> PPO (beta 0.1) -> evaluation, ~9 min on 2 cores
    python quickstart.py --seed 1    # another seed: a fresh SFT init, data order, comparisons, labelers and PPO run

Each step is the stage script with its defaults (run in this process, so the figures below are the stages' own):
  1. python synth.py                  posts, references and simulated labelers            -> data/synth/
  2. python sft.py                    supervised fine-tuning on the references             -> <out>/sft.pt
  3. python reward.py --collect       labelers compare SFT samples; the RM learns them     -> <out>/reward.pt
  4. python ppo.py                    PPO against the RM with a KL penalty to SFT (0.1)    -> <out>/ppo.pt
  5. python evaluate.py               gold preference over references, KL, best-of-N, ... -> <out>/eval.json
and ends with the paper's figure 1 in miniature: how often the gold labeler prefers each policy's summary to the
reference, beside the RM's held-out accuracy and the simulated labelers' agreement on the same pairs.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import data
import evaluate
import ppo
import reward
import sft
import synth
from model import SYNTH_SIZES
from support.checkpoint import CheckpointError
from support.cli import pick_device
from support.machine import matmul_peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (the synthetic world stays seed 0, so "
                   "seeds differ in training, not in the test posts)")
    p.add_argument("--out-dir", help="where the checkpoints and reports go (default: out/synth, or out/synth-seed<N> "
                   "for another seed)")
    p.add_argument("--data-dir", default=data.TASKS["synth"]["data_dir"], help="the synthetic splits")
    p.add_argument("--model", default="synth-s", choices=list(SYNTH_SIZES), help="the policy's (and reward model's) "
                   "size, built from scratch: " + ", ".join(f"{k} ({v['n_layer']} layers x {v['n_embd']})"
                                                              for k, v in SYNTH_SIZES.items()))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    args = p.parse_args(argv)
    out = args.out_dir or ("out/synth" if args.seed == 0 else f"out/synth-seed{args.seed}")
    common = ["--task", "synth", "--data-dir", args.data_dir, "--out-dir", out, "--seed", str(args.seed),
              "--device", args.device]
    steps = [("synthetic data", lambda: synth.write_synth(args.data_dir, seed=0)),
             ("supervised fine-tuning", lambda: sft.main(common + ["--model", args.model])),
             ("comparisons and the reward model", lambda: reward.main(common + ["--collect"])),
             (f"PPO against the reward model, beta {ppo.DEFAULTS['synth']['beta']:g}", lambda: ppo.main(common)),
             ("evaluation", lambda: evaluate.main(common + ["--no-plots"]))]
    t_start, times = time.time(), []
    for i, (name, step) in enumerate(steps, 1):
        print(f"\n{'=' * 20} quickstart [{i}/{len(steps)}] {name} ({(time.time() - t_start) / 60:.1f} min so far)",
              flush=True)
        t0 = time.time()
        step()
        times.append((name, time.time() - t0))
    minutes = (time.time() - t_start) / 60
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports kilobytes
    gflops = matmul_peak(pick_device(args.device)) / 1e9  # so a reader can scale the time to their machine
    summary(Path(out), args.seed, minutes, peak_gb, times, gflops)


def summary(out, seed, minutes, peak_gb, times, gflops):
    res = json.loads((out / "eval.json").read_text())
    pct = lambda m: f"{100 * m['mean']:5.1f} +- {100 * m['stderr']:.1f}"  # noqa: E731
    print(f"\n{'=' * 20} quickstart: seed {seed}, {minutes:.1f} min on a machine whose fp32 matmul peaks at "
          f"{gflops:.0f} GFLOP/s, peak memory {peak_gb:.2f} GB "
          f"({', '.join(f'{n.split()[0]} {t / 60:.1f}' for n, t in times[1:])} min)")
    print(f"{res['n']} test posts, summaries at temperature 0, judged by the gold labeler against the reference:")
    print(f"  {'':<12}{'preferred (%)':>16}{'length-controlled':>19}{'tokens':>8}{'KL to SFT':>11}")
    lc = res["length_controlled"]["preference"]
    for name, row in res["policies"].items():
        kl = f"{round(row['kl']['mean'], 2) + 0.0:.2f}" if "kl" in row else "-"  # + 0.0: no "-0.00" from noise
        ctrl = f"{100 * lc[name]:.1f}" if name in lc else "-"
        print(f"  {name:<12}{pct(row['preference']):>16}{ctrl:>19}{row['length']['mean']:>8.1f}{kl:>11}")
    agree = res.get("rm_analysis", {}).get("agreement", {})
    if "reward model" in agree:
        print(f"reward model: held-out accuracy {pct(agree['reward model'])} %, the simulated labelers agree with "
              f"each other {pct(agree['labelers (second opinion)'])} % on the same {res['rm_analysis']['n']} pairs")
    print(f"everything: {out}/eval.json, {out}/eval_samples.md; each stage's log in {out}/<stage>.log.jsonl")


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, CheckpointError, evaluate.JudgeError, OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"quickstart.py: error: {e}")
