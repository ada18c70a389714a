"""Host side of the "cute" backend that runs without a GPU: the descriptor exchange over Unix sockets.

(The cuMem mapping itself and the kernels run in tests/test_distributed_gpu.py.)
"""
import os
import subprocess
import sys

import pytest

from test_distributed_cpu import WORKER, results


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs Linux memfd_create")
def test_every_rank_receives_every_peers_descriptor():
    run = subprocess.run([sys.executable, "-m", "cutegrad.cli", "launch", "--standalone", "--nproc-per-node", "3",
                          WORKER, "fds"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    got = sorted(results(run.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in got] == [0, 1, 2]
    for r in got:
        assert r["seen"] == [f"payload of rank {p}" for p in range(3)]
        assert r["distinct"] == 3  # three different files, not three copies of one descriptor
