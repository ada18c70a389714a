"""NumPy model of the chunk schedule of kernels/cute/allreduce.py (one-shot and two-shot).

`run(algo, inputs, vector, grid, threads)` executes the kernel's schedule step
by step for every rank, block and thread: which 16-byte vector each one reads
(from which rank's workspace), reduces and writes, in the kernel's order.  It
returns every rank's output and a `Trace` of the accesses, which
`check_trace` verifies:
- coverage: every output vector of every rank written exactly once;
- reduction: in the reduce step, each vector is summed exactly once (one-shot:
  by every rank; two-shot: by exactly one owner rank), reading every rank's
  copy exactly once, in rank order;
- barrier scope: every read of a peer's workspace after a barrier reads a
  vector that the *same block index* wrote on that peer before the barrier, so
  the kernel's per-block barriers (not a grid-wide one) are enough.
Arithmetic follows the kernel: inputs in their dtype, fp32 accumulation in
rank order 0..W-1, one rounding to the dtype at the end.

The kernel's constants are passed in (defaults: kernels/cute/allreduce.py's),
so tests can shrink the grid to exercise wrap-around on small messages.
"""
from dataclasses import dataclass, field

import numpy as np

GRID = 128
THREADS = 512


@dataclass
class Trace:
    out_writes: np.ndarray  # (world, n_vec): writes of each output vector
    reduce_reads: np.ndarray  # (world, n_vec): reads of each rank's copy of each vector, in reduce steps
    reductions: np.ndarray  # (n_vec,): how many ranks reduced each vector (two-shot) / summed it (one-shot)
    scope_violations: list = field(default_factory=list)


def _rows_of_block(block, rows, grid):
    return range(block, rows, grid)


def run(algo, inputs, vector, grid=GRID, threads=THREADS):
    """Execute the schedule. inputs: (world, n) array in the element dtype, n a multiple of `vector`."""
    if algo not in ("one_shot", "two_shot"):
        raise ValueError(f"unknown algorithm {algo!r}")
    world, n = inputs.shape
    if n % vector:
        raise ValueError(f"n = {n} is not a multiple of the vector width {vector}")
    dtype = inputs.dtype
    n_vec = n // vector
    vin = inputs.reshape(world, n_vec, vector)
    rows = -(-n_vec // threads)
    ws = np.full((world, n_vec, vector), np.nan, dtype=np.float32).astype(dtype)  # poisoned workspaces
    writer = np.full((world, n_vec), -1)  # block that last wrote each workspace vector
    out = np.full((world, n_vec, vector), np.nan, dtype=np.float32).astype(dtype)
    trace = Trace(np.zeros((world, n_vec), int), np.zeros((world, n_vec), int), np.zeros(n_vec, int))

    def vectors_of(j):
        v = np.arange(j * threads, (j + 1) * threads)  # thread t handles vector t of row j
        return v[v < n_vec]

    def read_peer(p, v, block):
        bad = writer[p, v] != block
        if bad.any():
            trace.scope_violations.append((p, int(v[bad][0]), block, int(writer[p, v][bad][0])))
        return ws[p, v]

    def reduce_rows(v, block):
        acc = read_peer(0, v, block).astype(np.float32)
        trace.reduce_reads[0, v] += 1
        for p in range(1, world):
            acc = acc + read_peer(p, v, block).astype(np.float32)
            trace.reduce_reads[p, v] += 1
        return acc.astype(dtype)

    # (1) every rank copies its input into its own workspace
    for r in range(world):
        for b in range(grid):
            for j in _rows_of_block(b, rows, grid):
                v = vectors_of(j)
                ws[r, v] = vin[r, v]
                writer[r, v] = b
    # barrier 0 (per block): what follows reads only what the same block index wrote
    if algo == "one_shot":
        for r in range(world):
            for b in range(grid):
                for j in _rows_of_block(b, rows, grid):
                    v = vectors_of(j)
                    out[r, v] = reduce_rows(v, b)
                    trace.out_writes[r, v] += 1
                    trace.reductions[v] += 1
        return out.reshape(world, n), trace
    reduced = ws.copy()
    reduced_writer = writer.copy()
    for r in range(world):
        for b in range(grid):
            for j in _rows_of_block(b, rows, grid):
                if (j // grid) % world != r:
                    continue
                v = vectors_of(j)
                reduced[r, v] = reduce_rows(v, b)  # in place in the owner's workspace
                reduced_writer[r, v] = b
                trace.reductions[v] += 1
    # barrier 1 (per block); (5) all-gather from each row's owner
    ws, writer = reduced, reduced_writer
    for r in range(world):
        for b in range(grid):
            for j in _rows_of_block(b, rows, grid):
                v = vectors_of(j)
                out[r, v] = read_peer((j // grid) % world, v, b)
                trace.out_writes[r, v] += 1
    return out.reshape(world, n), trace


def check_trace(algo, trace, world):
    """Raise AssertionError unless the trace shows full coverage and a correct reduction."""
    n_vec = trace.reductions.size
    assert not trace.scope_violations, f"reads outside the per-block barrier's scope: {trace.scope_violations[:3]}"
    assert (trace.out_writes == 1).all(), "an output vector was written 0 or several times"
    expected = world if algo == "one_shot" else 1
    assert (trace.reductions == expected).all(), f"vectors reduced {set(trace.reductions.tolist())} times"
    assert (trace.reduce_reads == expected).all(), "a rank's copy was read 0 or several times in a reduction"
    return n_vec


def exact_sum(inputs):
    """What the kernel must produce: the fp32 sum in rank order, rounded once to the dtype."""
    acc = inputs[0].astype(np.float32)
    for p in range(1, inputs.shape[0]):
        acc = acc + inputs[p].astype(np.float32)
    return acc.astype(inputs.dtype)
