"""
Does the quick start's result hold on any seed and any machine? Runs `python quickstart.py` for several seeds, and
seed 0 again under two stand-ins for another machine: one thread (OMP_NUM_THREADS=1) and AVX2 kernels instead of
AVX-512 (ATEN_CPU_CAPABILITY=avx2). Each changes the float rounding, and with it the weights after a few dozen steps.
Prints one row per run, the mean and range over them, and checks the targets:
  - PPO is preferred to the references at least 25 points more often than SFT, in every run;
  - the spread of PPO's preference over all runs is at most 6 points;
  - the reward model's held-out accuracy is within 5 points of the labelers' agreement, in every run.

    python tools/seeds.py                    # seeds 0-4, then seed 0 at 1 thread and with AVX2: 7 quick starts
    python tools/seeds.py --jobs 2           # two at a time (each slower; the results are the same)
    python tools/seeds.py --report           # only the table, from the runs in out/seeds/

Writes out/seeds/<run>/ (each quick start's files and its log) and results/seeds.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402
from support.checkpoint import load_checkpoint  # noqa: E402
from support.machine import matmul_peak  # noqa: E402

VARIANTS = {"1-thread": dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), "avx2": dict(ATEN_CPU_CAPABILITY="avx2")}
MIN_GAIN, MAX_SPREAD, MAX_RM_GAP = 25.0, 6.0, 5.0  # points


def runs(seeds, variants):
    """(name, seed, extra environment) of each run."""
    return [(f"seed{s}", s, {}) for s in seeds] + [(f"seed0-{v}", 0, VARIANTS[v]) for v in variants]


def quickstart(out, name, seed, env):
    folder = out / name
    if (folder / "eval.json").exists():
        beta, want = load_checkpoint(folder / "ppo.pt")["args"]["beta"], ppo.DEFAULTS["synth"]["beta"]
        if beta != want:  # an earlier version's quick start: reported as today's, it would mislead
            raise SystemExit(f"seeds.py: {folder} is a quick start with PPO at beta {beta:g}, today's is {want:g}; "
                             "move it away (or pass another --out) to run it anew")
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "quickstart.log", "w") as log:
        proc = subprocess.run([sys.executable, "quickstart.py", "--seed", str(seed), "--out-dir", str(folder),
                               "--data-dir", str(folder / "data")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **env})
    if proc.returncode:
        raise SystemExit(f"seeds.py: {name} failed (exit {proc.returncode}); see {folder / 'quickstart.log'}")


def row(folder):
    res = json.loads((folder / "eval.json").read_text())
    agree = res["rm_analysis"]["agreement"]
    minutes = next((float(line.split(" min")[0].rsplit(" ", 1)[1]) for line in
                    (folder / "quickstart.log").read_text().splitlines() if line.startswith("=" * 20 + " quickstart:")),
                   None)
    pol = res["policies"]
    return dict(sft=100 * pol["sft"]["preference"]["mean"], ppo=100 * pol["ppo"]["preference"]["mean"],
                ppo_gold=pol["ppo"]["gold"]["total"], kl=pol["ppo"]["kl"]["mean"],
                rm=100 * agree["reward model"]["mean"], labelers=100 * agree["labelers (second opinion)"]["mean"],
                minutes=minutes)


def report(out, names):
    rows = {n: row(out / n) for n in names if (out / n / "eval.json").exists()}
    print(f"{'run':<16}{'SFT':>7}{'PPO':>7}{'gain':>7}{'PPO gold':>10}{'KL':>6}{'RM':>7}{'labelers':>10}{'gap':>6}"
          f"{'min':>6}")
    for n, r in rows.items():
        print(f"{n:<16}{r['sft']:7.1f}{r['ppo']:7.1f}{r['ppo'] - r['sft']:+7.1f}{r['ppo_gold']:10.3f}{r['kl']:6.2f}"
              f"{r['rm']:7.1f}{r['labelers']:10.1f}{r['labelers'] - r['rm']:6.1f}{r['minutes'] or 0:6.1f}")
    if not rows:
        return {}
    col = lambda k: np.array([r[k] for r in rows.values()])  # noqa: E731
    gain, ppo, gap = col("ppo") - col("sft"), col("ppo"), col("labelers") - col("rm")
    for name, v in (("SFT", col("sft")), ("PPO", ppo), ("PPO gold", col("ppo_gold")), ("RM", col("rm")),
                    ("labelers", col("labelers"))):
        print(f"{name:<9} mean {v.mean():7.3f}, range {v.min():.3f} to {v.max():.3f}")
    checks = {f"PPO - SFT >= {MIN_GAIN:g} in every run": bool(gain.min() >= MIN_GAIN),
              f"PPO spread <= {MAX_SPREAD:g}": bool(ppo.max() - ppo.min() <= MAX_SPREAD),
              f"RM within {MAX_RM_GAP:g} of the labelers in every run": bool(gap.max() <= MAX_RM_GAP)}
    for what, ok in checks.items():
        print(f"{'met' if ok else 'NOT MET'}: {what}")
    return dict(runs=rows, checks=checks)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="quick-start seeds")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS), help="seed 0 again "
                   "under these stand-ins for another machine")
    p.add_argument("--jobs", type=int, default=1, help="quick starts at a time")
    p.add_argument("--out", default="out/seeds", help="where the runs go")
    p.add_argument("--report", action="store_true", help="only print the table of the runs already there")
    args = p.parse_args()
    out, todo, t0 = Path(args.out).resolve(), runs(args.seeds, args.variants), time.time()
    if not args.report:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda r: quickstart(out, *r), todo))
    found = report(out, [name for name, _, _ in todo])
    found.update(matmul_gflops=matmul_peak() / 1e9)  # each run's own minutes are in its row
    if not args.report:  # a report's own time says nothing of the runs
        found.update(minutes=(time.time() - t0) / 60, jobs=args.jobs)
    Path("results").mkdir(exist_ok=True)
    Path("results/seeds.json").write_text(json.dumps(found, indent=1) + "\n")
    print((f"seeds: {found['minutes']:.0f} min for {len(todo)} runs, {args.jobs} at a time, " if "minutes" in found
           else "seeds: ") + f"on a machine whose fp32 matmul peaks at {found['matmul_gflops']:.0f} GFLOP/s; wrote "
          "results/seeds.json")


if __name__ == "__main__":
    main()
