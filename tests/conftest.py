"""Shared by the test files: the offline tokenizer cache, and tiny trained stages to build on."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import locations  # noqa: E402,F401  (sets TIKTOKEN_CACHE_DIR: the offline GPT-2 BPE)

import reward  # noqa: E402
import sft  # noqa: E402
import synth  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs stages end to end (seconds each); `-m \"not slow\"` skips them "
                            "for a quick inner loop, CI runs everything")


@pytest.fixture(scope="session")
def stages(tmp_path_factory):
    """Tiny SFT and reward models on a tiny synthetic dataset."""
    root = tmp_path_factory.mktemp("ppo")
    synth.write_synth(root / "data", seed=0, sizes=dict(train=960, valid=64, test=16, transfer=8))
    common = ["--task", "synth", "--data-dir", str(root / "data"), "--out-dir", str(root / "out"), "--cache-dir",
              str(root / "cache")]
    sft.main(common + ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "16", "--lr", "3e-3",
                       "--epochs", "2", "--val-size", "32", "--sample-n", "8"])
    reward.main(common + ["--train-posts", "480", "--valid-posts", "64", "--batch-size", "32", "--norm-n", "64",
                          "--val-size", "32", "--temperature", "0.7"])
    return root, common
