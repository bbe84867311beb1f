"""
The paper's findings in miniature, over model size: the whole loop at every synthetic model size and seed, then the
figures the paper draws from such runs. Writes results/findings.json and results/figure{1,5,6}.png.

    python tools/findings.py                                   # 4 sizes x 2 seeds, then the figures (see --help)
    python tools/findings.py --sizes synth-xs synth-s --seeds 0 --out out/findings-small    # a smaller sweep

Each run lives in <out>/<size>-seed<S>/ (sft, reward, ppo, evaluate: the quick start's defaults, PPO's beta 0.1, with
--model <size>) and is reused when it finished, so an interrupted sweep continues where it stopped.

figure1  gold preference over the references against policy size, for the references, SFT and PPO (the paper's
         figure 1, 1.3B to 12.9B), and each policy's mean gold total against the ceiling of 1 (the perfect summary)
figure5  gold score gained over the starting policy against d = sqrt(KL) (Gao et al. 2022): best-of-N at every size
         (each with its own RM) fitted to d (a - b d), and PPO at several betas (the quick start's size, seed 0)
         fitted to d (a - b log d); the fitted peak tells whether a larger RM pushes over-optimization later
figure6  RM held-out accuracy against model size, and against the number of comparisons (1/8, 1/4, 1/2, all: the
         quick start's size, seed 0), each with the fitted points per doubling (the paper: +1.8 per doubling of
         model size, +1.1 per doubling of data)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import synth  # noqa: E402
from model import SYNTH_SIZES  # noqa: E402
from support.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from support.eval_report import pyplot  # noqa: E402
from support.machine import matmul_peak  # noqa: E402


def stale(out, size):
    """Why the finished stages in `out` are not this sweep's (another model shape, or PPO at another beta: an earlier
    version's defaults), or None. Reused as they are, they would put two settings in one figure without a word."""
    if (out / "sft.pt").exists():
        config = load_checkpoint(out / "sft.pt")["config"]
        shape = {k: config[k] for k in SYNTH_SIZES[size]}
        if shape != SYNTH_SIZES[size]:
            return f"its sft.pt is {shape}, {size} is now {SYNTH_SIZES[size]}"
    if (out / "ppo.pt").exists():
        beta, want = load_checkpoint(out / "ppo.pt")["args"]["beta"], ppo.DEFAULTS["synth"]["beta"]
        if beta != want:
            return f"its ppo.pt was trained at beta {beta:g}, ppo.py's synth default is now {want:g}"
    return None


def run_loop(out, data_dir, size, seed, extra_eval=()):
    """The quick start's four stages at one size and seed; a stage whose output exists is not run again."""
    why = stale(out, size)
    if why:
        raise SystemExit(f"findings.py: {out} is from another setting: {why}. Move it away (or pass another --out) "
                         "to run it anew")
    common = ["--task", "synth", "--data-dir", str(data_dir), "--out-dir", str(out), "--seed", str(seed)]
    stages = [("sft.pt", lambda: sft.main(common + ["--model", size])),
              ("reward.pt", lambda: reward.main(common)),
              ("ppo.pt", lambda: ppo.main(common)),
              ("eval.json", lambda: evaluate.main(common + ["--no-plots", *extra_eval]))]
    times = json.loads((out / "minutes.json").read_text()) if (out / "minutes.json").exists() else {}
    for done, stage in stages:
        if not (out / done).exists():
            t0 = time.time()
            stage()
            times[done.split(".")[0]] = (time.time() - t0) / 60
            (out / "minutes.json").write_text(json.dumps(times) + "\n")
    return json.loads((out / "eval.json").read_text()), json.loads((out / "reward.json").read_text()), times


def parameters(checkpoint):
    """Parameters without the token and position embeddings, the count the scaling literature uses."""
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    embeddings = ("transformer.wte", "transformer.wpe")
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(embeddings))


def fit(d, y, form):
    """Least squares of y = d (a - b d) ("bon") or d (a - b log d) ("rl"), both linear in a and b. Returns a, b,
    R^2 and the d of the peak (None where the curve has none: b <= 0)."""
    d, y = np.asarray(d, float), np.asarray(y, float)
    x = np.stack([d, -d * (d if form == "bon" else np.log(np.maximum(d, 1e-9)))], 1)
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    r2 = 1 - ((y - x @ [a, b]) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    peak = (a / (2 * b) if form == "bon" else float(np.exp(a / b - 1))) if b > 0 else None
    return dict(a=float(a), b=float(b), r2=float(r2), peak_d=peak)


def per_doubling(x, y):
    """The slope of y against log2(x): points gained per doubling."""
    return float(np.polyfit(np.log2(x), y, 1)[0])


def figure1(runs):
    rows = []
    for size, per_seed in runs.items():
        row = dict(size=size, parameters=per_seed[0]["parameters"], seeds=[r["seed"] for r in per_seed])
        for name in ("reference", "sft", "ppo"):
            pols = [r["eval"]["policies"][name] for r in per_seed]
            row[name] = dict(preference=[p["preference"]["mean"] for p in pols],
                             gold=[p["gold"]["total"] for p in pols])
        rows.append(row)
        print(f"figure1 {size:<9} {row['parameters'] / 1e6:5.2f}M | preferred to the reference, per seed: SFT "
              + ", ".join(f"{100 * v:.1f}" for v in row["sft"]["preference"]) + " | PPO "
              + ", ".join(f"{100 * v:.1f}" for v in row["ppo"]["preference"]) + " | PPO gold total "
              + ", ".join(f"{v:.3f}" for v in row["ppo"]["gold"]) + " (ceiling 1)")
    return rows


def figure5(runs, betas_rows):
    out = dict(best_of_n={}, ppo=None)
    for size, per_seed in runs.items():
        curve = per_seed[0]["eval"]["best_of_n"]["rm"]  # seed 0's RM picking among seed 0's SFT samples
        d = [np.sqrt(r["kl"]) for r in curve]
        gain = [r["gold"]["mean"] - curve[0]["gold"]["mean"] for r in curve]
        out["best_of_n"][size] = dict(d=d, gold_gain=gain, **fit(d, gain, "bon"))
        f = out["best_of_n"][size]
        print(f"figure5 best-of-N {size:<9} a {f['a']:.3f} b {f['b']:.3f} R^2 {f['r2']:.2f} peak at d "
              + ("none (still rising)" if f["peak_d"] is None else f"{f['peak_d']:.2f}"))
    if betas_rows:
        d = [np.sqrt(max(r["kl"], 0.0)) for r in betas_rows]
        gain = [r["gold_gain"] for r in betas_rows]
        out["ppo"] = dict(points=betas_rows, **fit(d, gain, "rl"))
        f = out["ppo"]
        print(f"figure5 PPO over betas: a {f['a']:.3f} b {f['b']:.3f} R^2 {f['r2']:.2f} peak at d "
              + ("none" if f["peak_d"] is None else f"{f['peak_d']:.2f}"))
    return out


def ppo_betas(base, data_dir, betas, n_posts):
    """PPO from the middle size's seed-0 SFT and RM at each beta (at ppo.py's synth default: that run's own PPO), its
    checkpoints (every 10 updates) judged by gold against their KL to SFT."""
    rows = []
    for beta in betas:
        out = base.parent / f"{base.name}-beta{beta:g}"
        trained = base if beta == ppo.DEFAULTS["synth"]["beta"] else out
        common = ["--task", "synth", "--data-dir", str(data_dir), "--sft", str(base / "sft.pt"), "--reward",
                  str(base / "reward.pt")]
        if not (trained / "ppo.pt").exists():
            ppo.main(common + ["--out-dir", str(trained), "--beta", str(beta), "--save-every", "10"])
        if not (out / "eval.json").exists():
            steps = sorted(trained.glob("ppo_step*.pt"), key=lambda p: int(p.stem.removeprefix("ppo_step")))
            evaluate.main(common + ["--out-dir", str(out), "--policies", str(trained / "ppo.pt"), "--n-posts",
                                    str(n_posts), "--max-n", "0", "--analysis-n", "0", "--no-plots", "--sweep",
                                    *map(str, steps)])
        sweep = json.loads((out / "eval.json").read_text())["sweep"]
        start = next(r for r in sweep if r["stage"] == "sft")["gold"]["total"]
        rows += [dict(beta=beta, name=r["name"], kl=r["kl"]["mean"], gold_gain=r["gold"]["total"] - start,
                      preference=r["preference"]["mean"]) for r in sweep if r["stage"] == "ppo"]
    return rows


def figure6(runs, base, data_dir, fractions):
    by_size = [dict(size=s, parameters=r[0]["parameters"], accuracy=[x["reward"]["accuracy"]["synth"]["overall"]
                                                                      ["accuracy"] for x in r],
                    labelers=[x["reward"]["labeler_agreement"] for x in r]) for s, r in runs.items()]
    lines = (base / "comparisons" / "synth_train.json").read_text().splitlines()
    by_data = []
    for frac in fractions:
        n = int(len(lines) * frac)
        out = base.parent / f"{base.name}-rm{n}"
        if frac == 1:
            out = base
        elif not (out / "reward.json").exists():
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_subset.json").write_text("\n".join(lines[:n]) + "\n")
            reward.main(["--task", "synth", "--data-dir", str(data_dir), "--sft", str(base / "sft.pt"), "--out-dir",
                         str(out), "--comparisons", str(out / "train_subset.json"),
                         str(base / "comparisons" / "synth_valid.json")])
        rm = json.loads((out / "reward.json").read_text())
        by_data.append(dict(comparisons=n, accuracy=rm["accuracy"]["synth"]["overall"]["accuracy"],
                            labelers=rm["labeler_agreement"]))
    slope_size = per_doubling([r["parameters"] for r in by_size], [100 * np.mean(r["accuracy"]) for r in by_size])
    slope_data = per_doubling([r["comparisons"] for r in by_data], [100 * r["accuracy"] for r in by_data])
    print(f"figure6 RM accuracy: {slope_size:+.1f} points per doubling of model size (paper +1.8), "
          f"{slope_data:+.1f} per doubling of comparisons (paper +1.1)")
    return dict(by_size=by_size, by_data=by_data, per_doubling_size=slope_size, per_doubling_data=slope_data)


def plots(found, folder):
    plt = pyplot("findings")
    if plt is None:
        return
    rows = found["figure1"]
    x = [r["parameters"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, color in (("reference", "gray"), ("sft", "#66c2a5"), ("ppo", "#fc8d62")):
        y = [100 * np.mean(r[name]["preference"]) for r in rows]
        ax.plot(x, y, "o-", color=color, label=name)
        for xi, r in zip(x, rows):
            ax.plot([xi] * len(r[name]["preference"]), [100 * v for v in r[name]["preference"]], ".", color=color)
    ax.set(xscale="log", xlabel="policy parameters (without embeddings)", ylabel="gold prefers it to the reference (%)",
           title="Figure 1 in miniature")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "figure1.png", dpi=110)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for size, f in found["figure5"]["best_of_n"].items():
        d = np.linspace(0, max(f["d"]), 50)
        line = a1.plot(f["d"], f["gold_gain"], "o", label=size)[0]
        a1.plot(d, d * (f["a"] - f["b"] * d), "-", color=line.get_color(), lw=0.8)
    a1.set(xlabel="d = sqrt(KL)", ylabel="gold gained over SFT samples", title="best-of-N, d (a - b d)")
    a1.legend(fontsize=7)
    if found["figure5"]["ppo"]:
        f = found["figure5"]["ppo"]
        pts = f["points"]
        dots = a2.scatter([np.sqrt(max(p["kl"], 0)) for p in pts], [p["gold_gain"] for p in pts],
                          c=[np.log10(p["beta"]) for p in pts], cmap="viridis")
        fig.colorbar(dots, ax=a2, label="log10 beta")
        d = np.linspace(1e-3, max(np.sqrt(max(p["kl"], 0)) for p in pts), 50)
        a2.plot(d, d * (f["a"] - f["b"] * np.log(d)), "k-", lw=0.8)
    a2.set(xlabel="d = sqrt(KL)", ylabel="gold gained over SFT", title="PPO over betas, d (a - b log d)")
    fig.tight_layout()
    fig.savefig(folder / "figure5.png", dpi=110)

    f6 = found["figure6"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot([r["parameters"] for r in f6["by_size"]], [100 * np.mean(r["accuracy"]) for r in f6["by_size"]], "o-",
            label="reward model")
    a1.plot([r["parameters"] for r in f6["by_size"]], [100 * np.mean(r["labelers"]) for r in f6["by_size"]], "k--",
            label="labelers agree")
    a1.set(xscale="log", xlabel="RM parameters", ylabel="held-out accuracy (%)", title="Figure 6: model size")
    a1.legend(fontsize=8)
    a2.plot([r["comparisons"] for r in f6["by_data"]], [100 * r["accuracy"] for r in f6["by_data"]], "o-")
    a2.plot([r["comparisons"] for r in f6["by_data"]], [100 * r["labelers"] for r in f6["by_data"]], "k--")
    a2.set(xscale="log", xlabel="training comparisons", title="Figure 6: data")
    fig.tight_layout()
    fig.savefig(folder / "figure6.png", dpi=110)
    plt.close("all")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SYNTH_SIZES), default=list(SYNTH_SIZES), help="model sizes")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of every stage at each size")
    p.add_argument("--middle", default="synth-s", choices=list(SYNTH_SIZES), help="the size of figure 5's PPO betas "
                   "and figure 6's data axis (its seed-0 run; the quick start's)")
    p.add_argument("--betas", nargs="+", type=float, default=[0.005, 0.01, 0.02, 0.05, 0.1], help="figure 5: "
                   "PPO's KL coefficients (0.1, ppo.py's synth default, reuses the run's own PPO)")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.125, 0.25, 0.5, 1.0], help="figure 6: fractions "
                   "of the comparisons")
    p.add_argument("--max-n", type=int, default=32, help="figure 5: best-of-N up to this N (KL up to 2.5 at 32)")
    p.add_argument("--sweep-posts", type=int, default=250, help="figure 5: test posts judged per PPO checkpoint")
    p.add_argument("--out", default="out/findings", help="where the runs go")
    p.add_argument("--results", default="results", help="where findings.json and the PNGs go")
    args = p.parse_args(argv)
    if args.middle not in args.sizes or 0 not in args.seeds:
        p.error("--middle must be one of --sizes, and --seeds must include 0")
    out, t0 = Path(args.out), time.time()
    data_dir = out / "data"
    if not (data_dir / "synth.json").exists():
        synth.write_synth(data_dir, seed=0)
    runs = {}
    for size in args.sizes:
        for seed in args.seeds:
            res, rm, minutes = run_loop(out / f"{size}-seed{seed}", data_dir, size, seed, ["--max-n", str(args.max_n)])
            runs.setdefault(size, []).append(dict(seed=seed, eval=res, reward=rm, minutes=minutes,
                                                  parameters=parameters(out / f"{size}-seed{seed}" / "sft.pt")))
            print(f"findings: {size} seed {seed} done ({sum(minutes.values()):.1f} min of stages)")
    base = out / f"{args.middle}-seed0"
    betas_rows = ppo_betas(base, data_dir, sorted(args.betas), args.sweep_posts)
    f6 = figure6(runs, base, data_dir, sorted(args.fractions))
    # The sweep's cost is every invocation's time added up (<out>/spent.json), so that a rerun which only redraws the
    # figures from finished runs does not report its own minute as the sweep's (one killed before here is not counted).
    # The matmul peak printed beside it is the longest invocation's, the one that ran most of the sweep.
    spent = out / "spent.json"
    sessions = json.loads(spent.read_text()) if spent.exists() else []
    sessions.append(dict(minutes=(time.time() - t0) / 60, matmul_gflops=matmul_peak() / 1e9))
    spent.write_text(json.dumps(sessions) + "\n")
    found = dict(figure1=figure1(runs), figure5=figure5(runs, betas_rows), figure6=f6,
                 minutes={f"{s}-seed{r['seed']}": r["minutes"] for s, rs in runs.items() for r in rs},
                 total_minutes=sum(x["minutes"] for x in sessions), invocations=sessions,
                 matmul_gflops=max(sessions, key=lambda x: x["minutes"])["matmul_gflops"])
    folder = Path(args.results)
    folder.mkdir(exist_ok=True)
    (folder / "findings.json").write_text(json.dumps(found, indent=1) + "\n")
    plots(found, folder)
    print(f"findings: {found['total_minutes']:.0f} min in {len(sessions)} invocation(s) on a machine whose fp32 matmul "
          f"peaks at {found['matmul_gflops']:.0f} GFLOP/s; wrote {folder / 'findings.json'} and the PNGs in {folder}")


if __name__ == "__main__":
    main()
