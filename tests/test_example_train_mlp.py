"""Smoke test of examples/train_mlp.py: a short run trains both variants
(plain MLP and MLP with bncore.BatchNorm1d) through the example's own command
line, and the training loss falls for both. A few seconds."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py"


@pytest.fixture(scope="module")
def train_mlp():
    # examples/ is not a package: load the script from its path.
    spec = importlib.util.spec_from_file_location("train_mlp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_run(train_mlp, tmp_path_factory):
    path = tmp_path_factory.mktemp("train_mlp") / "results.json"
    results = train_mlp.main(
        ["--epochs", "3", "--lrs", "0.1", "--seed", "0", "--json", str(path), "--no-plot"]
    )
    return results, json.loads(path.read_text())


@pytest.mark.parametrize("variant", ["plain", "batchnorm"])
def test_training_loss_falls(short_run, variant):
    results, _ = short_run
    losses = results[0.1][variant]["train_loss"]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses


def test_json_report(short_run):
    results, report = short_run
    assert report["settings"]["lrs"] == [0.1]
    runs = {run["variant"]: run for run in report["runs"]}
    assert set(runs) == {"plain", "batchnorm"}
    for variant, run in runs.items():
        assert run["lr"] == 0.1
        assert run["train_loss"] == results[0.1][variant]["train_loss"]
        assert len(run["test_acc"]) == 3


def test_plot_written(train_mlp, short_run, tmp_path):
    pytest.importorskip("matplotlib")
    results, _ = short_run
    path = tmp_path / "curves.png"
    train_mlp.plot(path, results)
    assert path.read_bytes().startswith(b"\x89PNG")
