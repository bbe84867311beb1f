"""evaluate.py's outputs: the printed table, the samples page a person skims, the PNG figures (when matplotlib is
installed), and where the held-out comparisons and reference texts of the RM analysis are found on disk."""
from pathlib import Path

import data
import synth


def source(record):
    """The text a summary summarizes: a CNN/DM article or a post."""
    return record.get("article") or record["post"]


def held_out_comparisons(args):
    """The comparisons of the RM analysis: never trained on (valid1/valid2), TL;DR posts and CNN/DM articles."""
    if args.comparisons:
        files = args.comparisons
    elif args.task == "synth":
        files = [Path(args.out_dir) / "comparisons" / "synth_valid.json"]
    else:
        files = sorted((Path(args.data_dir) / "comparisons").glob("*.json"))
    files = [f for f in files if Path(f).is_file()]
    if not files:
        return []
    comps = [c for c in data.read_comparisons(files) if c["split"] != "train"]
    if any(str(c["id"]).startswith(synth.WORLD + "_") != (args.task == "synth") for c in comps):
        raise data.DataError(f"{[str(f) for f in files]}: comparisons of another task than --task {args.task}")
    return comps[:args.analysis_n]


def reference_texts(task, data_dir):
    """id -> reference summary, from whichever splits of the task are on disk (for ROUGE in the RM analysis)."""
    refs = {}
    for split in ("train", "valid", "test", "transfer"):
        try:
            refs.update((r["id"], data.as_response(r["summary"])) for r in data.load_split(task, split, data_dir))
        except data.DataError:
            pass
    return refs


def samples_page(results, records, texts, lengths, wins, show):
    """Markdown a person can skim: each post, its reference and every policy's summary with the judge's verdict."""
    lines = [f"# Samples: {results['task']} {results['data']}, judge {results['judge']}", "",
             "Summaries at temperature 0. Verdict: the judge's preference of the summary over the reference (1 win, "
             "0.5 tie, 0 loss).", ""]
    for i, rec in enumerate(records[:show]):
        head = rec.get("title") or rec.get("id")
        lines += [f"## {i + 1}. {head}", ""]
        lines += ["> " + line if line else ">" for line in source(rec).strip().splitlines()]
        lines.append("")
        for name, t in texts.items():
            verdict = "" if name == "reference" else f", verdict {wins[name][i]:g}"
            lines.append(f"- **{name}** ({lengths[name][i]} tokens{verdict}):{t[i]}")
        lines.append("")
    return "\n".join(lines)


def print_table(results):
    cols = "policy", "pref vs ref", "len-ctrl", "tokens", "R-1/R-2/R-L", "copy", "KL", "RM"
    print(f"evaluate: {results['task']} {results['data']}, {results['n']} posts, judge {results['judge']}")
    for name, row in results["policies"].items():
        if "judge" in row:
            print(f"  judge for {name}: {row['judge']}; {100 * row['eos_fraction']:.0f}% of its summaries ended "
                  "with EOS (the others scored -1 by a reward model, as in PPO)")
    print(f"{cols[0]:<14}{cols[1]:>14}{cols[2]:>10}{cols[3]:>8}{cols[4]:>16}{cols[5]:>7}{cols[6]:>7}{cols[7]:>8}")
    fmt = lambda m, f: "-" if m is None or m.get("mean") is None else format(round(m["mean"], 2) + 0.0, f)  # noqa
    for name, row in results["policies"].items():
        p, r = row["preference"], row["rouge"]
        lc = results["length_controlled"]["preference"].get(name)
        print(f"{name:<14}{100 * p['mean']:>8.1f} +-{100 * p['stderr']:4.1f}"
              f"{'-' if lc is None else format(100 * lc, '.1f'):>10}{row['length']['mean']:>8.1f}"
              f"{r['rouge1']:>8.2f}/{r['rouge2']:.2f}/{r['rougeL']:.2f}{row['copying']['mean']:>7.2f}"
              f"{fmt(row.get('kl'), '.2f'):>7}{fmt(row.get('rm_score'), '.2f'):>8}")


def pyplot(who):
    """matplotlib.pyplot drawing to files, or None (saying so, as `who`) where matplotlib is not installed: figures
    are optional everywhere, and matplotlib never becomes a requirement."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{who}: matplotlib is not installed; no figures (pip install matplotlib to get them)")
        return None
    return plt


def plot(results, out):
    """PNG figures when matplotlib is installed. Returns the files written."""
    plt = pyplot("evaluate")
    if plt is None:
        return []
    written, judge = [], results["judge"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(results["policies"])
    pref = [results["policies"][n]["preference"] for n in names]
    ax.bar(names, [100 * p["mean"] for p in pref], yerr=[100 * p["stderr"] for p in pref], color="#8da0cb")
    lc = results["length_controlled"]["preference"]
    ax.plot([n for n in names if n in lc], [100 * lc[n] for n in names if n in lc], "kD", label="length-controlled")
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set(ylabel=f"preferred over reference (%)\njudge {judge}", title="Figure 1 in miniature")
    ax.legend(loc="lower right", fontsize=8)
    written.append(out / "eval_preference.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=120)
    curves = [("sweep", "eval_overoptimization.png", "Figure 5: over-optimization"),
              ("best_of_n", "eval_best_of_n.png", "Figure 7: best-of-N")]
    for key, name, title in curves:
        if not results.get(key):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        series = results[key].items() if key == "best_of_n" else [("PPO checkpoints", results[key])]
        for label, rows in series:
            kl = [r["kl"] if key == "best_of_n" else r["kl"]["mean"] for r in rows]
            ax.errorbar(kl, [100 * r["preference"]["mean"] for r in rows], marker="o", label=f"{label}: {judge}",
                        yerr=[100 * r["preference"]["stderr"] for r in rows], capsize=2)
        ax.set(xlabel="KL to the SFT policy (nats)", ylabel="preferred over reference (%)", title=title)
        if all(r.get("rm_score") for _, rows in series for r in rows):
            twin = ax.twinx()
            for label, rows in series:
                kl = [r["kl"] if key == "best_of_n" else r["kl"]["mean"] for r in rows]
                twin.plot(kl, [r["rm_score"]["mean"] for r in rows], ls=":", marker=".", label=f"{label}: RM score")
            twin.set_ylabel("reward model score")
            twin.legend(loc="lower right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
        written.append(out / name)
        fig.tight_layout()
        fig.savefig(written[-1], dpi=120)
    plt.close("all")
    return written


def report(results):
    print_table(results)
    pct = lambda m: f"{100 * m['mean']:.1f} +- {100 * m['stderr']:.1f}"  # noqa: E731
    for row in results.get("sweep", []):
        print(f"  sweep {row['name']:<14} KL {row['kl']['mean']:6.2f} | preferred {pct(row['preference'])}"
              + (f" | RM {row['rm_score']['mean']:.2f}" if row.get("rm_score") else ""))
    for scorer, rows in results.get("best_of_n", {}).items():
        print(f"  best-of-N by {scorer:<6}" + " | ".join(f"N={r['n']} {100 * r['preference']['mean']:.1f}"
                                                        for r in rows))
    if "rm_analysis" in results:
        a = results["rm_analysis"]
        dropped = f"; {a['dropped_long']} dropped, too long for the RM" if a.get("dropped_long") else ""
        print(f"  agreement with held-out labeler choices (n={a['n']}{dropped}): "
              + ", ".join(f"{k} {pct(v)}" for k, v in a["agreement"].items()))
        print("  prefers the longer summary: " + ", ".join(f"{k} {pct(v)}" for k, v in a["prefers_longer"].items()
                                                            if k != "n"))
    if "probes" in results:
        print("  RM / gold prefer the perfect summary to its edit: " + ", ".join(
            f"{k} {100 * v['rm_prefers_original']['mean']:.0f}/{100 * v['gold_prefers_original']['mean']:.0f}"
            for k, v in results["probes"].items()))
