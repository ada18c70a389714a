"""The main job's acceptance run: `cutegrad train reverse --device cpu` with its CPU defaults.

It must reach >= 0.9 exact-sequence accuracy on held-out sequences, write the
checkpoint, metrics and plot, and the checkpoint must reload (in a fresh
process, through `cutegrad eval`) and reproduce the same metric. It takes
minutes on two cores, hence `slow`; the wall time is recorded in
metrics.json, not asserted (docs/training.md has the measured figure).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest


def _cutegrad():
    exe = shutil.which("cutegrad")
    return [exe] if exe else [sys.executable, "-m", "cutegrad.cli"]


@pytest.mark.slow
def test_cpu_defaults_solve_reversal_and_the_checkpoint_reproduces_the_accuracy(tmp_path):
    out = tmp_path / "runs" / "r"
    env = dict(os.environ, CUTEGRAD_OFFLINE="1", CUTEGRAD_CACHE=str(tmp_path / "cache"))
    run = subprocess.run(_cutegrad() + ["train", "reverse", "--device", "cpu", "--out", str(out), "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "scaled-down preset for cpu" in run.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    acc = metrics["eval"]["value"]
    assert metrics["eval"]["metric"] == "exact_sequence_accuracy"
    assert metrics["eval"]["heldout_sequences"] == 1000
    assert acc >= 0.9, f"exact-sequence accuracy {acc} after {metrics['steps']} steps; losses end {metrics['loss'][-5:]}"
    assert (out / "model.safetensors").is_file()
    assert (out / "loss.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)

    ev = subprocess.run(_cutegrad() + ["eval", "reverse", "--checkpoint", str(out / "model.safetensors"),
                                       "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["metric"] == "exact_sequence_accuracy"
    assert result["value"] == acc
