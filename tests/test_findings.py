"""tools/findings.py's fits: Gao et al. (2022)'s functional forms recovered from exact curves, their peaks, and the
points-per-doubling slope of figure 6."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("findings", ROOT / "tools" / "findings.py")
findings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(findings)


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
