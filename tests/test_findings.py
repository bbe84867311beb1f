"""tools/findings.py's fits: Gao et al. (2022)'s functional forms recovered from exact curves, their peaks, and the
points-per-doubling slope of figure 6; tools/seeds.py's verdicts; both tools' refusal to reuse a run of another
setting."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("findings", ROOT / "tools" / "findings.py")
findings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(findings)
spec = importlib.util.spec_from_file_location("seeds", ROOT / "tools" / "seeds.py")
seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds)


def test_best_of_n_form_is_recovered_with_its_peak():
    d = np.sqrt(np.log([1, 2, 4, 8, 16, 32]) - (np.array([1, 2, 4, 8, 16, 32]) - 1) / [1, 2, 4, 8, 16, 32])
    f = findings.fit(d, d * (0.3 - 0.1 * d), "bon")
    assert f["a"] == pytest.approx(0.3, abs=1e-9) and f["b"] == pytest.approx(0.1, abs=1e-9)
    assert f["r2"] == pytest.approx(1.0) and f["peak_d"] == pytest.approx(1.5)  # d (a - b d) peaks at a / 2b


def test_rl_form_is_recovered_with_its_peak():
    d = np.linspace(0.1, 4, 20)
    f = findings.fit(d, d * (0.2 - 0.15 * np.log(d)), "rl")
    assert f["a"] == pytest.approx(0.2, abs=1e-9) and f["b"] == pytest.approx(0.15, abs=1e-9)
    peak = f["peak_d"]  # d (a - b log d) peaks where a - b log d - b = 0
    assert 0.2 - 0.15 * np.log(peak) - 0.15 == pytest.approx(0, abs=1e-9)


def test_a_curve_that_keeps_rising_has_no_peak():
    d = np.linspace(0.1, 2, 10)
    assert findings.fit(d, d * (0.3 + 0.05 * d), "bon")["peak_d"] is None


def test_points_per_doubling():
    x = [1e5, 2e5, 4e5, 8e5]
    assert findings.per_doubling(x, [60.0, 61.8, 63.6, 65.4]) == pytest.approx(1.8)


def test_seeds_report_checks_each_target(tmp_path):
    """tools/seeds.py's verdicts from the quick starts' eval.json: gain, spread and RM gap, each able to fail."""

    def run(name, sft, ppo, rm, labelers):
        folder = tmp_path / name
        folder.mkdir()
        pol = lambda p, gold: dict(preference=dict(mean=p), gold=dict(total=gold), kl=dict(mean=2.0))  # noqa: E731
        res = dict(policies=dict(sft=pol(sft, 0.8), ppo=pol(ppo, 0.9)),
                   rm_analysis=dict(agreement={"reward model": dict(mean=rm),
                                               "labelers (second opinion)": dict(mean=labelers)}))
        (folder / "eval.json").write_text(json.dumps(res))
        (folder / "quickstart.log").write_text("=" * 20 + " quickstart: seed 0, 8.7 min on a machine\n")

    run("a", 0.46, 0.92, 0.80, 0.83)
    run("b", 0.47, 0.90, 0.79, 0.83)
    checks = seeds.report(tmp_path, ["a", "b"])["checks"]
    assert all(checks.values())
    run("c", 0.60, 0.84, 0.76, 0.83)  # gain 24, spread 8, gap 7: each target fails
    assert not any(seeds.report(tmp_path, ["a", "b", "c"])["checks"].values())


def test_the_size_axis_spans_16x_in_order(tmp_path):
    """Figure 1 and 6 need a size axis like the paper's (1.3B to 12.9B, 10x): four synth sizes, each larger than the
    one before, the largest at least 16x the smallest, counted as findings.parameters counts them (no embeddings)."""
    from model import GPT, GPTConfig, SYNTH_SIZES
    from support.checkpoint import save_checkpoint
    counts = []
    for name, shape in SYNTH_SIZES.items():
        model = GPT(GPTConfig(vocab_size=100, block_size=32, **shape))
        save_checkpoint(tmp_path / f"{name}.pt", model, stage="sft", task="synth", tokenizer="synth")
        counts.append(findings.parameters(tmp_path / f"{name}.pt"))
    assert len(counts) >= 4 and counts == sorted(set(counts)) and counts[-1] >= 16 * counts[0]


def test_a_finished_run_of_another_setting_is_refused_not_reused(tmp_path):
    """findings.py reuses finished stages; one trained at another size's shape or another PPO beta (an earlier
    version's defaults) would enter the figures as this sweep's, so run_loop stops and names the folder."""
    from model import GPT, GPTConfig, SYNTH_SIZES
    from support.checkpoint import save_checkpoint
    import ppo
    run = tmp_path / "synth-s-seed0"
    run.mkdir()

    def write(name, shape, stage, beta=None):
        model = GPT(GPTConfig(vocab_size=50, block_size=16, **shape))
        save_checkpoint(run / name, model, stage=stage, task="synth", tokenizer="synth",
                        args=None if beta is None else dict(beta=beta))

    write("sft.pt", SYNTH_SIZES["synth-s"], "sft")
    write("ppo.pt", SYNTH_SIZES["synth-s"], "ppo", beta=ppo.DEFAULTS["synth"]["beta"])
    assert findings.stale(run, "synth-s") is None
    other = 2 * ppo.DEFAULTS["synth"]["beta"]
    write("ppo.pt", SYNTH_SIZES["synth-s"], "ppo", beta=other)
    why = f"synth-s-seed0 is from another setting: its ppo.pt was trained at beta {other:g}"
    with pytest.raises(SystemExit, match=why):
        findings.run_loop(run, tmp_path / "data", "synth-s", 0)
    write("sft.pt", SYNTH_SIZES["synth-m"], "sft")
    assert "its sft.pt is" in findings.stale(run, "synth-s")
    # tools/seeds.py the same way: a finished quick start (its eval.json) at another beta is not reported as today's
    (run / "eval.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"synth-s-seed0 is a quick start with PPO at beta {other:g}"):
        seeds.quickstart(tmp_path, "synth-s-seed0", 0, {})
    write("ppo.pt", SYNTH_SIZES["synth-s"], "ppo", beta=ppo.DEFAULTS["synth"]["beta"])
    assert seeds.quickstart(tmp_path, "synth-s-seed0", 0, {}) is None  # today's: reused, nothing run
