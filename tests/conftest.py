"""Shared fixtures: small generated datasets (tests never need the real Carvana data)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic  # noqa: E402

SHARED_CARVANA = ROOT.parent / "shared" / "carvana"


@pytest.fixture(scope="session", autouse=True)
def check_cache_in_tmp(tmp_path_factory) -> None:
    """The dataset check caches its verdicts in a temporary folder, not in the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))  # subprocesses inherit it


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic Carvana-format dataset: 4 cars x 16 views at 96x64."""
    return synthetic.generate_synthetic(tmp_path_factory.mktemp("synthetic") / "data", cars=4, size=(96, 64), seed=1)


TINY_RUN = ["--features", "4", "8", "--height", "32", "--width", "48", "--batch-size", "8", "--workers", "0",
            "--val-cars", "1", "--epochs", "1"]


def one_epoch_run(data: Path, out: Path, *flags: str) -> Path:
    """out, once train.py has trained a tiny UNet for one epoch on data, one car held out."""
    import train
    assert train.main(["--data-dir", str(data), "--out-dir", str(out), *TINY_RUN, *flags]) == 0
    return out


def needs_shared_carvana():
    """Skip marker for checks that need the 32 real cars in ../shared/carvana."""
    return pytest.mark.skipif(not (SHARED_CARVANA / "train").is_dir(),
                              reason="../shared/carvana (real Carvana cars) is not present")
