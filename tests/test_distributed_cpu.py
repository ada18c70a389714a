"""cutegrad.distributed on the "cpu" backend, with real processes (tests/distributed_workers.py).

Collectives with 2, 3 and 4 processes against NumPy; data parallel against one
process; the launcher; `cutegrad train --nproc-per-node 2`; the faults (dead,
absent and hung ranks, mismatched arguments, destroyed groups), each ending in a
clear error with no process left behind.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "distributed_workers.py")
sys.path.insert(0, str(HERE))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(rank, world, port, **extra):
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})


def run_ranks(world, args, ranks=None, timeout=120, **extra):
    """Start the given ranks (default all) of a `world`-rank job directly; returns their
    CompletedProcess-like results after every one has exited (killing none)."""
    port = free_port()
    procs = {r: subprocess.Popen([sys.executable, WORKER, *args], env=env_for(r, world, port, **extra),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (range(world) if ranks is None else ranks)}
    out = {}
    try:
        for r, p in procs.items():
            stdout, stderr = p.communicate(timeout=timeout)
            out[r] = (p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
                raise AssertionError("a rank was still running after the others finished (left behind)")
    return out


def results(stdout):
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def launch(nproc, args, timeout=180, env=None):
    return subprocess.run([sys.executable, "-m", "cutegrad.cli", "launch", "--standalone", "--nproc-per-node",
                           str(nproc), WORKER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ, OMP_NUM_THREADS="1"))


def _leftover_shm():
    return {p.name for p in Path("/dev/shm").glob("cutegrad-*")} if Path("/dev/shm").is_dir() else set()


@pytest.mark.parametrize("world,dtypes", [
    (2, "float32,float64,float16,bfloat16,int32,int64"),
    (3, "float32,bfloat16,int64"),
    (4, "float64,float16"),
])
def test_every_collective_matches_numpy(world, dtypes):
    before = _leftover_shm()
    run = launch(world, ["collectives", "1,7,1001", dtypes])
    assert run.returncode == 0, run.stderr[-3000:]
    got = results(run.stdout)
    assert sorted(r["rank"] for r in got) == list(range(world))
    assert all(r["checked"] > 0 for r in got)
    assert _leftover_shm() <= before, "shared-memory files left behind"


def test_shapes_or_dtypes_differing_across_ranks_raise_on_every_rank():
    out = run_ranks(3, ["mismatch"])
    for rank, (code, stdout, stderr) in out.items():
        assert code == 0, stderr[-2000:]
        (res,) = results(stdout)
        shape_err, dtype_err = res["errors"]
        assert "ranks' arguments differ" in shape_err and "(5,)" in shape_err and "(4,)" in shape_err
        assert "float64" in dtype_err and "float32" in dtype_err


def test_lifecycle_errors_are_clear():
    out = run_ranks(2, ["lifecycle"])
    for rank, (code, stdout, stderr) in out.items():
        assert code == 0, stderr[-2000:]
        (res,) = results(stdout)
        e = res["errors"]
        assert "not initialized" in e["before_init"]
        assert "already initialized" in e["second_init"]
        assert "destroyed" in e["after_destroy"] or "not initialized" in e["after_destroy"]
        assert "unknown reduce op" in e["bad_op"]
        assert "src 2" in e["bad_src"]
        assert "world_size (2)" in e["bad_list"]
        assert e["int_avg"].startswith("TypeError") and "AVG" in e["int_avg"]
        assert e["not_tensor"].startswith("TypeError")
        assert res["initialized"] is False


def test_a_rank_that_dies_makes_the_others_raise_quickly():
    out = run_ranks(3, ["die", "1"])
    assert out[1][0] == 17
    for rank in (0, 2):
        code, stdout, stderr = out[rank]
        assert code == 3, stderr[-2000:]
        (res,) = results(stdout)
        assert "rank 1 died" in res["error"], res["error"]
        assert res["seconds"] < 10  # detected by the closed connection, not the 60 s timeout


def test_a_rank_that_hangs_times_out_with_a_clear_error():
    t0 = time.monotonic()
    out = run_ranks(2, ["hang", "1", "4"], TEST_TIMEOUT=1.5)
    code, stdout, stderr = out[0]
    assert code == 3, stderr[-2000:]
    (res,) = results(stdout)
    assert "timed out after 1.5 s" in res["error"] and "rank(s) [1]" in res["error"], res["error"]
    assert 1.4 < res["seconds"] < 15
    # the sleeper wakes to a group whose store (on rank 0) is gone: an error, not a hang
    code1, stdout1, stderr1 = out[1]
    assert code1 == 3, stderr1[-2000:]
    assert "rank 0" in results(stdout1)[0]["error"]
    assert time.monotonic() - t0 < 60


def test_a_rank_that_never_arrives_times_out_in_init():
    out = run_ranks(2, ["absent"], ranks=[0], TEST_TIMEOUT=1.0)
    code, stdout, stderr = out[0]
    assert code == 3, stderr[-2000:]
    (res,) = results(stdout)
    assert "rendezvous" in res["error"] and "rank(s) [1]" in res["error"], res["error"]
    assert res["seconds"] < 10


def test_launcher_reports_the_failed_rank_and_leaves_nothing_running():
    before = _leftover_shm()
    run = launch(3, ["die", "2"], env=dict(os.environ, TEST_TIMEOUT="300"))
    assert _leftover_shm() <= before, "shared-memory files left behind"
    assert run.returncode in (3, 17), run.stderr[-2000:]
    assert "exited with code" in run.stderr
    assert "stopping the other workers" in run.stderr
    pids = [int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("PID ")]
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _ddp_single(steps, batch):
    import distributed_workers
    return distributed_workers.ddp_run(steps, batch, 0, False)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_two_processes_equal_one_process_step_for_step(tmp_path, accumulate):
    """float64, 20 steps, global batch 8: losses and final weights of 2 processes (with or without
    no_sync accumulation of 2 micro-batches) equal those of 1 process."""
    out = tmp_path / "ddp.npz"
    run = launch(2, ["ddp", "20", "8", str(out), str(accumulate)])
    assert run.returncode == 0, run.stderr[-3000:]
    buckets = results(run.stdout)[0]["buckets"]
    assert len(buckets) > 3  # a small bucket_cap_mb: several buckets, reduced as they fill
    losses, params, _ = _ddp_single(20, 8)
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], losses, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["params"], params, rtol=0, atol=1e-10)
    assert losses[-1] < losses[0]


def test_distributed_sampler_partitions_the_dataset():
    from cutegrad.data import DistributedSampler
    for n, world in [(10, 3), (7, 2), (16, 4)]:
        for shuffle in (False, True):
            shares = [DistributedSampler(range(n), world, r, shuffle=shuffle, seed=5) for r in range(world)]
            for s in shares:
                s.set_epoch(3)
            idx = [list(s) for s in shares]
            assert len({len(i) for i in idx}) == 1 and len(idx[0]) == len(shares[0])
            flat = [i for share in idx for i in share]
            assert set(flat) == set(range(n))
            assert len(flat) - n == (-n) % world  # padding repeats only what is needed
            dropped = [list(DistributedSampler(range(n), world, r, shuffle=shuffle, drop_last=True))
                       for r in range(world)]
            flat = [i for share in dropped for i in share]
            assert len(flat) == len(set(flat)) == n - n % world
    a = DistributedSampler(range(20), 2, 0, seed=1)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    with pytest.raises(ValueError, match="rank 2"):
        DistributedSampler(range(4), 2, 2)


def test_train_reverse_with_two_cpu_processes_runs_to_the_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, CUTEGRAD_OFFLINE="1", CUTEGRAD_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "cutegrad.cli", "train", "reverse", "--device", "cpu",
                          "--nproc-per-node", "2", "--steps", "6", "--batch-size", "8", "--eval-examples", "20",
                          "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_parallel"] == {"processes": 2, "global_batch": 8, "per_process_batch": 4,
                                        "loss": "averaged over processes"}
    assert len(metrics["loss"]) == 6 and all(np.isfinite(metrics["loss"]))
    assert (out / "model.safetensors").is_file()
    assert run.stderr.count("data parallel over 2 processes") == 1  # rank 0 alone speaks


def test_sigterm_to_the_launcher_stops_every_worker_and_removes_their_shared_memory():
    before = _leftover_shm()
    proc = subprocess.Popen([sys.executable, "-m", "cutegrad.cli", "launch", "--standalone", "--nproc-per-node", "2",
                             "--grace-period", "2", WORKER, "hang", "1", "300"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TEST_TIMEOUT="300"))
    pids = []
    while len(pids) < 2:  # both workers started (and rank 0 waits in an all_reduce holding its shared memory)
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        if line.startswith("PID "):
            pids.append(int(line.split()[1]))
    time.sleep(3)
    assert _leftover_shm() - before, "the job should hold a shared-memory folder while it runs"
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + 15 and "stopping the workers" in stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _leftover_shm() <= before, "shared-memory files left behind"
