"""`cutegrad train` on the GPU: eager and whole-step CUDA graphs, fp32 and bf16 autocast.

The graphed run replays the same kernels on the same data from the same seed,
so its losses must match the eager run's step for step (the first step is the
eager warm-up inside `graphed`); dropout is on in minigpt, where Philox offsets
advanced per replay give the same masks as eager steps.
"""
import json
import math

import numpy as np
import pytest

import cutegrad
from cutegrad.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cutegrad.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(tmp_path, name, workload, *extra):
    out = tmp_path / name
    rc = main(["train", workload, "--steps", "40", "--out", str(out), "--eval-examples", "64", "--no-progress",
               *extra])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("workload, extra", [
    ("reverse", ()),
    ("vit", ("--batch-size", "32")),
    ("minigpt", ("--batch-size", "8", "--tokenizer", "char")),
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graphed_training_matches_eager(tmp_path, workload, extra, dtype):
    eager = _train(tmp_path, "eager", workload, "--dtype", dtype, *extra)
    graphed = _train(tmp_path, "graphed", workload, "--dtype", dtype, "--graphs", *extra)
    assert eager["device"].startswith("cuda") and graphed["graphs"] and not eager["graphs"]
    assert len(eager["loss"]) == len(graphed["loss"]) == 40
    assert all(math.isfinite(v) for v in eager["loss"] + graphed["loss"])
    np.testing.assert_allclose(graphed["loss"], eager["loss"], rtol=1e-5)
    assert np.mean(eager["loss"][-5:]) < eager["loss"][0]  # it learns (warm-up keeps the lr small here)
