"""cutegrad.distributed on two GPUs (marker multigpu; written here, run by the two-GPU run of issue 13).

Every backend's collectives against NCCL's results and NumPy, 1 element to 1 GiB, bf16/fp16/fp32, eager and
in a captured CUDA graph; the "cute" all-reduce bit-identical across ranks; data-parallel training on 2 GPUs
equal to 1 GPU at the same global batch.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from cutegrad import cuda
from test_distributed_cpu import WORKER, _ddp_single, results

pytestmark = [
    pytest.mark.gpu, pytest.mark.multigpu,
    pytest.mark.skipif(not cuda.is_available() or cuda.device_count() < 2, reason="needs two CUDA GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("nccl") is None,
                       reason="needs nccl4py: pip install 'cutegrad[distributed]'"),
]


def launch(args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "cutegrad.cli", "launch", "--standalone", "--nproc-per-node", "2",
                           WORKER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("backend", ["nccl", "cute"])
def test_collectives_match_nccl_and_numpy_up_to_1gib(backend):
    run = launch(["gpu", backend, str(1 << 30)])
    assert run.returncode == 0, run.stderr[-4000:]
    got = results(run.stdout)
    assert len(got) == 2 and all(r["checked"] > 0 for r in got)
    if backend == "cute":
        assert all(r["last_kernel"] and r["last_kernel"].startswith("allreduce_sm_") for r in got)


@pytest.mark.parametrize("backend", ["nccl", "cute"])
def test_ddp_on_two_gpus_matches_one_process(tmp_path, backend):
    out = tmp_path / "ddp.npz"
    run = launch(["gpu_ddp", backend, "20", str(out)])
    assert run.returncode == 0, run.stderr[-4000:]
    losses, params, _ = _ddp_single(20, 8)  # float64 on the CPU: the GPUs run float32
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], losses, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(got["params"], params, rtol=2e-3, atol=2e-3)


def test_train_minigpt_data_parallel_on_two_gpus(tmp_path):
    run = subprocess.run([sys.executable, "-m", "cutegrad.cli", "train", "minigpt", "--nproc-per-node", "2",
                          "--steps", "30", "--out", str(tmp_path / "run"), "--no-progress"],
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ, CUTEGRAD_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
