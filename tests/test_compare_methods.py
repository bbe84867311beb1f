"""tools/compare_methods.py's bookkeeping: each stage's own peak memory and time, a failed stage named with its log,
a finished stage not run again unless its inputs changed, and the best setting of each method chosen on its mean over
seeds."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "tools" / "compare_methods.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_each_stage_records_its_own_peak_memory_and_time(tmp_path):
    # run from a small process, as the tool runs its stages: Linux counts a parent's resident set at the fork in its
    # child's peak, and pytest's process is large
    big = "import numpy; a = numpy.ones(400 * 2**20 // 8); a += 1"  # touches 400 MiB
    script = (f"import importlib.util, pathlib\n"
              f"spec = importlib.util.spec_from_file_location('c', {str(ROOT / 'tools' / 'compare_methods.py')!r})\n"
              f"c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
              f"t, costs = pathlib.Path({str(tmp_path)!r}), {{}}\n"
              f"c.run_stage('big', ['-c', {big!r}], t / 'big.done', t, costs)\n"
              f"c.run_stage('small', ['-c', 'print(1 + 1)'], t / 'small.done', t, costs)\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    costs = json.loads((tmp_path / "costs.json").read_text())
    assert costs["big"]["peak_gb"] > 0.39  # the allocation, plus the interpreter
    assert costs["small"]["peak_gb"] < 0.2  # its own peak, not the largest child's so far
    assert all(c["minutes"] > 0 for c in costs.values())
    assert (tmp_path / "logs" / "small.log").read_text() == "2\n"


def test_a_finished_stage_is_not_run_again_and_a_failed_one_names_its_log(tmp_path):
    (tmp_path / "done.pt").write_text("x")
    costs = {}
    compare.run_stage("skipped", ["-c", "raise SystemExit(3)"], tmp_path / "done.pt", tmp_path, costs)
    assert costs == {}
    with pytest.raises(SystemExit, match=r"failed \(exit 3\); see .*logs/broken.log"):
        compare.run_stage("broken", ["-c", "import sys; sys.exit(3)"], tmp_path / "never.pt", tmp_path, costs)
    assert "broken" not in costs


def test_a_finished_stage_runs_again_when_its_inputs_changed(tmp_path):
    """The evaluation is reused only while it judged the same policies: a grown grid of betas is judged again."""
    touch = f"import pathlib; p = pathlib.Path({str(tmp_path / 'eval.json')!r}); p.write_text(p.read_text() + 'x') " \
            "if p.exists() else p.write_text('x')"
    runs = lambda: (tmp_path / "eval.json").read_text().count("x")  # noqa: E731
    costs = {}
    compare.run_stage("evaluate", ["-c", touch], tmp_path / "eval.json", tmp_path, costs, inputs=["a.pt", "b.pt"])
    compare.run_stage("evaluate", ["-c", touch], tmp_path / "eval.json", tmp_path, costs, inputs=["a.pt", "b.pt"])
    assert runs() == 1
    compare.run_stage("evaluate", ["-c", touch], tmp_path / "eval.json", tmp_path, costs, inputs=["a.pt", "c.pt"])
    assert runs() == 2
    (tmp_path / "logs" / "evaluate.inputs.json").unlink()  # no record (an earlier version's run): judged again
    compare.run_stage("evaluate", ["-c", touch], tmp_path / "eval.json", tmp_path, costs, inputs=["a.pt", "c.pt"])
    assert runs() == 3


def point(method, setting, preference, kl=1.0):
    return dict(method=method, setting=setting, preference=preference, kl=kl, gold=0.9, minutes=2.0, peak_gb=1.0,
                used="3,200 episodes")


def test_the_best_setting_is_the_best_mean_over_seeds_not_the_best_single_run():
    seeds = {"0": [point("ppo", "beta 0.01", 95.0, kl=4.0), point("ppo", "beta 0.05", 85.0),
                   point("dpo", "beta 0.1", 70.0)],
             "1": [point("ppo", "beta 0.01", 60.0, kl=6.0), point("ppo", "beta 0.05", 84.0),
                   point("dpo", "beta 0.1", 72.0)]}
    best = compare.best_settings(seeds)
    assert set(best) == {"ppo", "dpo"}  # methods that did not run are left out
    assert best["ppo"]["setting"] == "beta 0.05"  # mean 84.5 beats beta 0.01's 77.5, despite its 95
    assert best["ppo"]["preference"] == pytest.approx(84.5)
    assert (best["ppo"]["low"], best["ppo"]["high"], best["ppo"]["seeds"]) == (84.0, 85.0, 2)
    assert best["dpo"]["preference"] == pytest.approx(71.0) and best["dpo"]["kl"] == pytest.approx(1.0)


def test_a_stage_without_a_recorded_cost_reports_none():
    seeds = {"0": [dict(point("best-of-N", "N 4", 80.0), minutes=None)]}
    seeds["0"][0].pop("minutes")
    seeds["0"][0].pop("peak_gb")
    best = compare.best_settings(seeds)["best-of-N"]
    assert best["minutes"] is None and best["peak_gb"] is None and best["preference"] == 80.0


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_methods.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--seeds", "--rl-betas", "--dpo-betas", "--max-n", "--n-posts", "--bon-posts", "--report"):
        assert flag in out
