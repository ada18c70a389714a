"""The NumPy model of the CuTeDSL all-reduce's chunk schedule (kernels/reference/allreduce_schedule.py).

For world sizes 2..8 and message sizes divisible by nothing in particular it
proves full coverage (every output vector written once on every rank), a
reduction that reads every rank's copy exactly once, reads that stay inside the
per-block barriers' scope, and the exact result: the fp32 sum in rank order
rounded once, bit-identical on every rank.
"""
import importlib.util
import os

import ml_dtypes
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


schedule = _load("kernels/reference/allreduce_schedule.py", "allreduce_schedule")
kernel = _load("kernels/cute/allreduce.py", "allreduce_family")

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def _inputs(world, n, dtype, seed):
    rng = np.random.default_rng([seed, world, n])
    return rng.standard_normal((world, n)).astype(DTYPES[dtype])


@pytest.mark.parametrize("algo", ["one_shot", "two_shot"])
@pytest.mark.parametrize("world", range(2, 9))
def test_schedule_covers_everything_and_sums_exactly(algo, world):
    # a small grid and block so that rows wrap around the grid and the owners several times
    for dtype in ("bf16", "fp16", "fp32"):
        vec = kernel.AllReduceSpec(algo, dtype).vector
        for n_vec in (1, 2, 7, 13, 97, 211):
            x = _inputs(world, n_vec * vec, dtype, 1)
            out, trace = schedule.run(algo, x, vec, grid=3, threads=5)
            schedule.check_trace(algo, trace, world)
            want = schedule.exact_sum(x)
            for r in range(world):
                assert out[r].tobytes() == want.tobytes(), f"rank {r} differs from the rank-order fp32 sum"
            err = np.abs(out[0].astype(np.float64) - x.astype(np.float64).sum(0))
            tol = {"bf16": 2 ** -7, "fp16": 2 ** -10, "fp32": 2 ** -22}[dtype] * (1 + np.abs(x.astype(np.float64)).sum(0))
            assert (err <= tol).all()


@pytest.mark.parametrize("algo", ["one_shot", "two_shot"])
def test_schedule_with_the_kernels_own_grid(algo):
    """The kernel's GRID x THREADS, with messages large enough to wrap rows around the grid (two-shot: and
    around the owners), and sizes that are not multiples of a row."""
    world = 3
    for n_vec in (1, 511, 513, kernel.GRID * kernel.THREADS * 3 + 77):
        x = _inputs(world, n_vec * 4, "fp32", 2)
        out, trace = schedule.run(algo, x, 4, grid=kernel.GRID, threads=kernel.THREADS)
        schedule.check_trace(algo, trace, world)
        assert all(out[r].tobytes() == schedule.exact_sum(x).tobytes() for r in range(world))


def test_check_trace_catches_a_broken_schedule():
    x = _inputs(2, 40, "fp32", 3)
    out, trace = schedule.run("two_shot", x, 4, grid=3, threads=2)
    trace.out_writes[1, 3] = 0
    with pytest.raises(AssertionError, match="written 0 or several"):
        schedule.check_trace("two_shot", trace, 2)
    out, trace = schedule.run("one_shot", x, 4, grid=3, threads=2)
    trace.scope_violations.append((0, 1, 2, 0))
    with pytest.raises(AssertionError, match="barrier"):
        schedule.check_trace("one_shot", trace, 2)


def test_model_rejects_sizes_the_kernel_rejects():
    with pytest.raises(ValueError, match="multiple of the vector"):
        schedule.run("one_shot", np.zeros((2, 7), np.float32), 4)


def test_host_mirrors_of_the_kernel_constants_agree():
    from cutegrad.distributed import cute_backend
    assert (cute_backend.MAX_RANKS, cute_backend.GRID, cute_backend.BARRIERS) == \
        (kernel.MAX_RANKS, kernel.GRID, kernel.BARRIERS)
    assert cute_backend.FLAG_WORDS == kernel.FLAG_WORDS
    assert cute_backend.FLAG_BYTES >= 4 * kernel.FLAG_WORDS and cute_backend.FLAG_BYTES % 16 == 0
    assert (schedule.GRID, schedule.THREADS) == (kernel.GRID, kernel.THREADS)


def test_route_picks_the_kernel_only_where_it_applies():
    from cutegrad.distributed import ReduceOp
    from cutegrad.distributed.cute_backend import route
    table = {"one_shot_max_bytes": 1024, "cute_max_bytes": 1 << 20}
    assert route("bfloat16", ReduceOp.SUM, 1024, 2, table) == "one_shot"
    assert route("float32", ReduceOp.AVG, 1040, 8, table) == "two_shot"
    assert route("float32", ReduceOp.SUM, 2 << 20, 2, table) == "nccl"  # above the hand-over
    assert route("float32", ReduceOp.MAX, 1024, 2, table) == "nccl"
    assert route("float64", ReduceOp.SUM, 1024, 2, table) == "nccl"
    assert route("float32", ReduceOp.SUM, 1028, 2, table) == "nccl"  # not a multiple of 16 bytes
    assert route("float32", ReduceOp.SUM, 1024, 9, table) == "nccl"
    assert route("float32", ReduceOp.SUM, 0, 2, table) == "nccl"


def test_bench_derives_the_handover_table_from_its_measurements():
    from bench.allreduce import handover_table

    def row(nbytes, one, two, nccl):
        return {"bytes": nbytes, "one_shot_graphed_us": one, "two_shot_graphed_us": two, "nccl_graphed_us": nccl}
    rows = [row(4096, 5, 9, 20), row(1 << 20, 12, 10, 30), row(1 << 30, 9000, 3000, 3100)]
    assert handover_table(rows) == {"one_shot_max_bytes": 4096, "cute_max_bytes": None}
    rows[-1] = row(1 << 30, 9000, 3200, 3100)
    assert handover_table(rows) == {"one_shot_max_bytes": 4096, "cute_max_bytes": 1 << 20}


protocol = _load("kernels/reference/allreduce_protocol.py", "allreduce_protocol")


def _launches(seed):
    rng = np.random.default_rng(seed)
    return [str(a) for a in rng.choice(["one_shot", "two_shot"], size=6)]


def test_protocol_never_deadlocks_or_races_under_random_interleavings():
    """Six mixed launches back to back, 2..4 ranks, every interleaving a seeded scheduler picks: the
    epoch flags and the two parity areas keep every read on its own launch's data, and nothing hangs."""
    for seed in range(150):
        result = protocol.simulate(2 + seed % 3, 2, _launches(seed), seed)
        assert result == "ok", f"seed {seed}: {result[:300]}"


def test_protocol_model_catches_the_naive_designs():
    naive_wait = [protocol.simulate(2 + s % 3, 2, _launches(s), s, wait_while=lambda seen, e: seen != e)
                  for s in range(150)]
    assert any(r.startswith("deadlock") for r in naive_wait), "waiting for equality should deadlock sometimes"
    one_area = [protocol.simulate(2 + s % 3, 2, _launches(s), s, parities=1) for s in range(150)]
    assert any(r.startswith("race") for r in one_area), "a single workspace area should race sometimes"
