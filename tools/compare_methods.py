"""
Which method? PPO, RLOO, DPO and best-of-N on the synthetic task, judged by its gold labeler at equal KL to SFT: the
question users of RLHF ask, answered where a ground truth exists (the paper's figure 5, with four methods).

    python tools/compare_methods.py                     # 2 seeds, 4 betas per method, best-of-N 1..64 (~1 h, 2 cores)
    python tools/compare_methods.py --seeds 0 --rl-betas 0.05 --dpo-betas 0.1     # one point per method
    python tools/compare_methods.py --report            # the table and chart again, from the finished runs

For each seed, in <out>/seed<S>/, every stage with the quick start's defaults and that seed:
  sft.pt, reward.pt   python sft.py; python reward.py --collect (10,000 comparisons of SFT samples)
  ppo-beta<B>/        python ppo.py --beta B (3,200 episodes, as the quick start)
  rloo-beta<B>/       python ppo.py --estimator rloo --beta B (the same episodes: 4 samples of each of 800 prompts)
  dpo-beta<B>/        python dpo.py --beta B (one epoch over the reward model's 10,000 comparisons)
  bon/                best-of-N: N SFT samples at temperature 0.7, the reward model picks one, N = 1, 2, ..., 64
  eval/               one python evaluate.py over SFT and every trained policy
Every policy is judged as evaluate.py judges it: temperature-0 summaries of the test posts, gold preference over the
references, KL to SFT (the mean of log pi/sft over samples at 0.7), the reward model's score and the gold total.
Best-of-N's KL is the exact log N - (N - 1) / N. Each stage runs as its own process, so its wall time and peak memory
(resident set) are its own, and a finished stage is reused: an interrupted comparison continues where it stopped.

Writes results/methods.json (every point and every stage's cost) and results/methods.png: gold preference against
KL for the four methods, and the reward model's score against the gold total (over-optimization: the RM's score
rises while gold's falls).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("ppo", "rloo", "dpo", "best-of-N")


def read_costs(folder):
    """{stage: dict(minutes, peak_gb)} of the stages run_stage ran in `folder`."""
    return json.loads((folder / "costs.json").read_text()) if (folder / "costs.json").exists() else {}


def run_stage(name, argv, done, folder, costs, inputs=None):
    """Run `python argv` as its own process unless `done` exists; record its minutes and peak resident memory in
    `costs` (and <folder>/costs.json). `inputs` (a list of strings), when given, is recorded beside the log, and a
    finished stage whose record differs runs again (the evaluation, once the grid of betas has grown). A failed stage
    stops the comparison, naming its log. Linux counts the parent's resident set at the fork in the child's peak, so
    this process imports nothing large (torch) until every stage has run."""
    record = folder / "logs" / f"{name}.inputs.json"
    if done.exists() and (inputs is None or record.exists() and json.loads(record.read_text()) == inputs):
        return
    log_path = folder / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"compare: {folder.name} {name} ...", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak memory, not the sum of all
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"compare_methods.py: {folder.name} {name} failed (exit {proc.returncode}); see {log_path}")
    peak_gb = usage.ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux
    costs[name] = dict(minutes=(time.time() - t0) / 60, peak_gb=peak_gb)
    (folder / "costs.json").write_text(json.dumps(costs, indent=1) + "\n")
    if inputs is not None:
        record.write_text(json.dumps(inputs) + "\n")
    print(f"compare: {folder.name} {name} done in {costs[name]['minutes']:.1f} min, peak {peak_gb:.2f} GB", flush=True)


def run_seed(folder, data_dir, seed, rl_betas, dpo_betas, max_n, n_posts, bon_posts):
    """Every stage of one seed (see the module's docstring); returns the trained policies as (method, beta, path)."""
    folder.mkdir(parents=True, exist_ok=True)
    costs = read_costs(folder)
    common = ["--task", "synth", "--data-dir", data_dir, "--seed", seed]
    models = ["--sft", folder / "sft.pt", "--reward", folder / "reward.pt"]
    run_stage("sft", ["sft.py", *common, "--out-dir", folder], folder / "sft.pt", folder, costs)
    run_stage("reward", ["reward.py", *common, "--out-dir", folder, "--collect"], folder / "reward.pt", folder, costs)
    policies = []
    for method in ("ppo", "rloo"):
        for beta in rl_betas:
            out = folder / f"{method}-beta{beta:g}"
            run_stage(out.name, ["ppo.py", *common, *models, "--out-dir", out, "--beta", beta, "--estimator",
                                 "gae" if method == "ppo" else "rloo"], out / "ppo.pt", folder, costs)
            policies.append((method, beta, out / "ppo.pt"))
    comparisons = [folder / "comparisons" / f"synth_{split}.json" for split in ("train", "valid")]
    for beta in dpo_betas:
        out = folder / f"dpo-beta{beta:g}"
        run_stage(out.name, ["dpo.py", *common, "--sft", folder / "sft.pt", "--comparisons", *comparisons,
                             "--out-dir", out, "--beta", beta], out / "dpo.pt", folder, costs)
        policies.append(("dpo", beta, out / "dpo.pt"))
    judged = ["--n-posts", n_posts, "--analysis-n", 0, "--no-plots"]
    run_stage("best-of-N", ["evaluate.py", *common, *models, "--out-dir", folder / "bon", "--policies",
                            folder / "sft.pt", "--max-n", max_n, "--bon-posts", bon_posts, *judged],
              folder / "bon" / "eval.json", folder, costs)
    judged_policies = [folder / "sft.pt", *(p for _, _, p in policies)]
    run_stage("evaluate", ["evaluate.py", *common, *models, "--out-dir", folder / "eval", "--policies",
                           *judged_policies, "--max-n", 0, *judged],
              folder / "eval" / "eval.json", folder, costs, inputs=[str(p) for p in judged_policies])
    return policies


def points(folder, policies):
    """One point per trained policy and per best-of-N, each with what the chart and the table need."""
    from evaluate import policy_names  # the names evaluate.py gave the policies in its eval.json
    evaluation = json.loads((folder / "eval" / "eval.json").read_text())["policies"]
    costs = read_costs(folder)
    paths = [folder / "sft.pt"] + [p for _, _, p in policies]
    rows = {name: evaluation[name] for name in policy_names(list(map(str, paths)))}
    out = [dict(method="sft", setting="-", kl=0.0, **summary_of(rows.pop(next(iter(rows)))))]
    for (method, beta, path), row in zip(policies, rows.values()):
        stage = json.loads((path.parent / f"{path.stem}.json").read_text())
        used = (f"{stage['episodes']:,} episodes" if method != "dpo" else
                f"{stage['train_comparisons']:,} comparisons")
        out.append(dict(method=method, setting=f"beta {beta:g}", beta=beta, kl=row["kl"]["mean"], used=used,
                        **summary_of(row), **costs.get(path.parent.name, {})))
    bon = json.loads((folder / "bon" / "eval.json").read_text())["best_of_n"]["rm"]
    cost = costs.get("best-of-N", {})
    for r in bon:
        out.append(dict(method="best-of-N", setting=f"N {r['n']}", n=r["n"], kl=r["kl"],
                        preference=100 * r["preference"]["mean"], stderr=100 * r["preference"]["stderr"],
                        rm_score=r["rm_score"]["mean"], gold=r["gold"]["mean"],
                        used=f"{r['n']} samples a summary", **cost))
    return out


def summary_of(row):
    return dict(preference=100 * row["preference"]["mean"], stderr=100 * row["preference"]["stderr"],
                rm_score=row["rm_score"]["mean"], gold=row["gold"]["total"])


def best_settings(seeds):
    """For each method, the setting whose preference over the references, averaged over the seeds, is highest:
    that mean, the range over seeds, the mean KL there and the mean cost. `seeds`: {seed: points}."""
    table = {}
    for method in METHODS:
        by_setting = {}
        for pts in seeds.values():
            for p in pts:
                if p["method"] == method:
                    by_setting.setdefault(p["setting"], []).append(p)
        if not by_setting:
            continue
        setting, pts = max(by_setting.items(), key=lambda kv: np.mean([p["preference"] for p in kv[1]]))
        mean = lambda key: float(np.mean([p[key] for p in pts])) if all(key in p for p in pts) else None  # noqa
        table[method] = dict(setting=setting, seeds=len(pts), preference=mean("preference"),
                             low=min(p["preference"] for p in pts), high=max(p["preference"] for p in pts),
                             kl=mean("kl"), gold=mean("gold"), minutes=mean("minutes"), peak_gb=mean("peak_gb"),
                             used=pts[0].get("used"))
    return table


def report(found):
    print(f"\n{'method':<11}{'best setting':>14}{'preferred (%)':>15}{'range':>13}{'KL':>6}{'gold':>7}"
          f"{'minutes':>9}{'peak GB':>9}  used")
    for method, b in found["best"].items():
        minutes = "-" if b["minutes"] is None else f"{b['minutes']:.1f}"
        peak = "-" if b["peak_gb"] is None else f"{b['peak_gb']:.2f}"
        print(f"{method:<11}{b['setting']:>14}{b['preference']:15.1f}{b['low']:7.1f}-{b['high']:<5.1f}{b['kl']:6.2f}"
              f"{b['gold']:7.3f}{minutes:>9}{peak:>9}  {b['used']}")
    sft = [p["preference"] for pts in found["seeds"].values() for p in pts if p["method"] == "sft"]
    print(f"SFT: {np.mean(sft):.1f}% over the references (mean of {len(sft)} seeds). Best-of-N's minutes are the "
          f"whole curve's (64 samples a post); every row's time includes loading and, for RL, the in-run evaluations.")
    print(f"{found['minutes']:.0f} min in all on a machine whose fp32 matmul peaks at {found['matmul_gflops']:.0f} "
          f"GFLOP/s")


def plot(found, path):
    from support.eval_report import pyplot
    plt = pyplot("compare")
    if plt is None:
        return
    colors = {"sft": "black", "ppo": "#fc8d62", "rloo": "#8da0cb", "dpo": "#66c2a5", "best-of-N": "#e78ac3"}
    markers = ["o", "s", "^", "D"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (seed, pts) in enumerate(found["seeds"].items()):
        for method, color in colors.items():
            mine = sorted((p for p in pts if p["method"] == method), key=lambda p: p["kl"])
            if not mine:
                continue
            label = method if i == 0 else None
            a1.plot([p["kl"] for p in mine], [p["preference"] for p in mine], marker=markers[i % 4], color=color,
                    label=label, lw=0.8, ms=4)
            a2.plot([p["gold"] for p in mine], [p["rm_score"] for p in mine], marker=markers[i % 4], color=color,
                    label=label, lw=0 if method != "best-of-N" else 0.8, ms=4)
    a1.set(xlabel="KL to SFT (nats)", ylabel="gold prefers it to the reference (%)",
           title="gold preference against KL (markers: seeds)")
    a2.set(xlabel="gold total (1 = the perfect summary)", ylabel="reward model's score",
           title="what the RM sees against what gold sees")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"compare: wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of every stage (the world is seed 0)")
    p.add_argument("--rl-betas", nargs="+", type=float, default=[0.01, 0.02, 0.05, 0.1],
                   help="KL coefficients of PPO and RLOO (the quick start: 0.1)")
    p.add_argument("--dpo-betas", nargs="+", type=float, default=[0.03, 0.1, 0.3, 1.0],
                   help="DPO's beta (its synth default: 0.1; smaller strays further from SFT)")
    p.add_argument("--max-n", type=int, default=64, help="best-of-N for N = 1, 2, 4, ... up to this")
    p.add_argument("--n-posts", type=int, default=500, help="test posts each policy summarizes")
    p.add_argument("--bon-posts", type=int, default=250, help="test posts of best-of-N")
    p.add_argument("--out", default="out/methods", help="where the runs go")
    p.add_argument("--results", default="results", help="where methods.json and methods.png go")
    p.add_argument("--report", action="store_true", help="no training: the table and chart from finished seeds")
    args = p.parse_args(argv)
    out, t0 = Path(args.out).resolve(), time.time()
    data_dir = out / "data"
    policies = {}
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        if args.report:
            if (folder / "eval" / "eval.json").exists():
                policies[seed] = [(m, b, folder / f"{m}-beta{b:g}" / ("dpo.pt" if m == "dpo" else "ppo.pt"))
                                  for m, betas in (("ppo", args.rl_betas), ("rloo", args.rl_betas),
                                                   ("dpo", args.dpo_betas)) for b in betas]
            else:
                print(f"compare: {folder} has not finished; left out")
            continue
        if not (data_dir / "synth.json").exists():
            run_stage("data", ["synth.py", "--out-dir", data_dir], data_dir / "synth.json", out, {})
        policies[seed] = run_seed(folder, data_dir, seed, args.rl_betas, args.dpo_betas, args.max_n, args.n_posts,
                                  args.bon_posts)
    sys.path.insert(0, str(ROOT))  # only now: see run_stage
    from support.machine import matmul_peak
    found = dict(seeds={str(s): points(out / f"seed{s}", p) for s, p in policies.items()}, args=vars(args))
    if not found["seeds"]:
        raise SystemExit("compare_methods.py: no finished seed to report")
    found["minutes"] = sum(c["minutes"] for s in found["seeds"]  # every stage's own time, however many calls
                           for c in read_costs(out / f"seed{s}").values())
    found["matmul_gflops"] = matmul_peak() / 1e9
    found["best"] = best_settings(found["seeds"])
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "methods.json").write_text(json.dumps(found, indent=1) + "\n")
    report(found)
    plot(found, folder / "methods.png")
    print(f"compare: wrote {folder / 'methods.json'} ({(time.time() - t0) / 60:.1f} min this call)")


if __name__ == "__main__":
    main()
