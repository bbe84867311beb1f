"""
The paper's findings in miniature on the synthetic task: the runs behind docs/results.md's findings, their numbers in
results/findings.json and small PNGs in results/. Run `python quickstart.py --seed S` for the seeds first.

    python tools/findings.py                    # everything below, ~15 min on 2 CPU cores
    python tools/findings.py --only figure6     # one part

figure1   preference over references of reference / SFT / PPO over the quick start's seeds (their eval.json)
figure5   over-optimization: one low-beta PPO run from the seed-0 SFT and RM, its checkpoints judged by gold and
          scored by the RM against KL (evaluate.py --sweep)
figure6   RM held-out accuracy against the number of training comparisons: the seed-0 comparisons, first N of them
figure7   best-of-N by the RM and by ROUGE, judged by gold (from the seed-0 evaluation)
probes    section 4.3: the RM and gold on a perfect summary against one edit of it (from the seed-0 evaluation)
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402

PARTS = ("figure1", "figure5", "figure6", "figure7", "probes")


def seed_dirs(seeds):
    return [Path("out/synth" if s == 0 else f"out/synth-seed{s}") for s in seeds]


def figure1(args, found):
    rows = {}
    for seed, d in zip(args.seeds, seed_dirs(args.seeds)):
        res = json.loads((d / "eval.json").read_text())
        rm = json.loads((d / "reward.json").read_text())
        for name, row in res["policies"].items():
            rows.setdefault(name, []).append(dict(seed=seed, preference=row["preference"]["mean"],
                                                  stderr=row["preference"]["stderr"], length=row["length"]["mean"],
                                                  length_controlled=res["length_controlled"]["preference"].get(name),
                                                  kl=row.get("kl", {}).get("mean")))
        acc = rm["accuracy"]["synth"]["overall"]
        rows.setdefault("reward model", []).append(dict(seed=seed, accuracy=acc["accuracy"], stderr=acc["stderr"],
                                                        labelers=rm["labeler_agreement"]))
    found["figure1"] = rows
    for name, per_seed in rows.items():
        key = "accuracy" if name == "reward model" else "preference"
        values = [r[key] for r in per_seed]
        print(f"figure1 {name:<13} {key} over seeds {args.seeds}: " + ", ".join(f"{100 * v:.1f}" for v in values)
              + f" (mean {100 * np.mean(values):.1f}, spread {100 * (max(values) - min(values)):.1f})")


def figure5(args, found):
    base, out = seed_dirs([0])[0], Path(f"out/synth-beta{args.low_beta:g}")
    common = ["--task", "synth", "--sft", str(base / "sft.pt"), "--reward", str(base / "reward.pt")]
    if not (out / "ppo.pt").exists():
        ppo.main(common + ["--out-dir", str(out), "--beta", str(args.low_beta), "--episodes", str(args.episodes),
                           "--save-every", "10"])
    steps = sorted(out.glob("ppo_step*.pt"), key=lambda p: int(p.stem.removeprefix("ppo_step")))
    evaluate.main(common + ["--out-dir", str(out), "--policies", str(out / "ppo.pt"), "--max-n", "0",
                            "--analysis-n", "0", "--sweep", *map(str, steps)])
    res = json.loads((out / "eval.json").read_text())
    found["figure5"] = dict(beta=args.low_beta, episodes=args.episodes, sweep=res["sweep"])
    for r in res["sweep"]:
        kl = round(r["kl"]["mean"], 2) + 0.0  # + 0.0: no "-0.00" from the noise of SFT's own KL
        print(f"figure5 {r['name']:<12} KL {kl:6.2f} | gold preferred {100 * r['preference']['mean']:5.1f}"
              f" +- {100 * r['preference']['stderr']:.1f} | RM {r['rm_score']['mean']:.2f}")


def figure6(args, found):
    base = seed_dirs([0])[0]
    lines = (base / "comparisons" / "synth_train.json").read_text().splitlines()
    points = []
    for n in args.sizes:
        out = Path(f"out/synth-rm{n}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_subset.json").write_text("\n".join(lines[:n]) + "\n")
        if not (out / "reward.json").exists():
            reward.main(["--task", "synth", "--sft", str(base / "sft.pt"), "--out-dir", str(out), "--comparisons",
                         str(out / "train_subset.json"), str(base / "comparisons" / "synth_valid.json")])
        rm = json.loads((out / "reward.json").read_text())
        acc = rm["accuracy"]["synth"]["overall"]
        points.append(dict(comparisons=n, accuracy=acc["accuracy"], stderr=acc["stderr"],
                           labelers=rm["labeler_agreement"]))
        print(f"figure6 {n:>6} comparisons: held-out accuracy {100 * acc['accuracy']:.1f} +- {100 * acc['stderr']:.1f}"
              f" (labelers {100 * rm['labeler_agreement']:.1f})")
    found["figure6"] = points


def from_seed0(args, found, part):
    res = json.loads((seed_dirs([0])[0] / "eval.json").read_text())
    found[part] = res["best_of_n"] if part == "figure7" else dict(probes=res["probes"], analysis=res["rm_analysis"])


def plots(found, folder):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("findings: matplotlib is not installed; no PNGs")
        return
    if "figure1" in found:  # the per-seed bars of the quick start
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = [n for n in found["figure1"] if n != "reward model"]
        for k, name in enumerate(names):
            v = [100 * r["preference"] for r in found["figure1"][name]]
            ax.bar(k, np.mean(v), color="#8da0cb")
            ax.plot([k] * len(v), v, "k.", label="one seed" if k == 0 else None)
        ax.set_xticks(range(len(names)), names)
        ax.axhline(50, color="gray", ls="--", lw=0.8)
        ax.set(ylabel="gold prefers it to the reference (%)", title="Figure 1 in miniature")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "figure1.png", dpi=110)
    curves = dict(figure5=("sweep", f"Figure 5: over-optimization (beta {found.get('figure5', {}).get('beta')})"),
                  figure7=(None, "Figure 7: best-of-N"))
    for part, (key, title) in curves.items():
        if part not in found:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        twin = ax.twinx()
        series = {"PPO": found[part][key]} if key else found[part]
        for name, rows in series.items():
            kl = [r["kl"]["mean"] if isinstance(r["kl"], dict) else r["kl"] for r in rows]
            ax.plot(kl, [100 * r["preference"]["mean"] for r in rows], "o-", label=f"{name}: gold")
            twin.plot(kl, [r["rm_score"]["mean"] for r in rows], ".:", label=f"{name}: RM score")
        ax.set(xlabel="KL to the SFT policy (nats)", ylabel="gold prefers it to the reference (%)", title=title)
        twin.set_ylabel("reward model score")
        ax.legend(loc="upper left", fontsize=7)
        twin.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{part}.png", dpi=110)
    if "figure6" in found:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        pts = found["figure6"]
        ax.errorbar([p["comparisons"] for p in pts], [100 * p["accuracy"] for p in pts],
                    yerr=[100 * p["stderr"] for p in pts], marker="o", capsize=2, label="reward model")
        ax.plot([p["comparisons"] for p in pts], [100 * p["labelers"] for p in pts], "k--", label="labeler agreement")
        ax.set(xscale="log", xlabel="training comparisons", ylabel="held-out accuracy (%)", title="Figure 6")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "figure6.png", dpi=110)
    plt.close("all")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="quick-start seeds for figure 1")
    p.add_argument("--low-beta", type=float, default=0.001, help="figure 5: the KL coefficient of the long run")
    p.add_argument("--episodes", type=int, default=6400, help="figure 5: episodes of that run")
    p.add_argument("--sizes", nargs="+", type=int, default=[625, 1250, 2500, 5000, 10000],
                   help="figure 6: numbers of training comparisons")
    p.add_argument("--results", default="results", help="where findings.json and the PNGs go")
    args = p.parse_args()
    folder = Path(args.results)
    folder.mkdir(exist_ok=True)
    path = folder / "findings.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    for part in args.only:
        {"figure1": figure1, "figure5": figure5, "figure6": figure6}.get(
            part, lambda a, f: from_seed0(a, f, part))(args, found)
        path.write_text(json.dumps(found, indent=1) + "\n")
    plots(found, folder)
    print(f"findings: wrote {path} and the PNGs in {folder}")


if __name__ == "__main__":
    main()
