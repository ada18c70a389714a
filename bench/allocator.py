"""Host time of an alloc+free pair of a cached size: cutegrad's allocator vs PyTorch's.

    python -m bench.allocator [--pairs 100000] [--out bench/results]

For each size, both allocators first serve the size once (so it is cached),
then run 1,000 batches of 100 alloc+free pairs; a batch's time / 100 is one
sample and the reported number is the median sample (so 1e5 pairs in all).
cutegrad: ``get_allocator(0).malloc(n, stream)`` + ``free(block)``; PyTorch:
``torch.empty(n, dtype=torch.uint8, device="cuda")`` + ``del``, both on the
current (legacy default) stream, in the same process on the same GPU. The
PyTorch number includes creating a Python tensor object, which cutegrad's
Block does not; a cutegrad tensor adds its own object on top of this.

Writes ``allocator-<gpu>.json`` (schema in DESIGN.md; ratio = torch time /
cutegrad time, above 1 means cutegrad is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SIZES = [(512, "512 B"), (4096, "4 KiB"), (1 << 20, "1 MiB"), (16 << 20, "16 MiB")]
BATCH = 100


def time_pairs(alloc_free, pairs):
    """Median over batches of the per-pair host time in microseconds."""
    alloc_free(BATCH)  # warm: the size is cached from here on
    samples = []
    clock = time.perf_counter_ns
    for _ in range(pairs // BATCH):
        t0 = clock()
        alloc_free(BATCH)
        samples.append((clock() - t0) / BATCH / 1000.0)
    return statistics.median(samples)


def cutegrad_loop(alloc, nbytes, stream):
    malloc, free = alloc.malloc, alloc.free

    def run(n):
        for _ in range(n):
            free(malloc(nbytes, stream))
    return run


def torch_loop(torch, nbytes):
    empty, uint8 = torch.empty, torch.uint8

    def run(n):
        for _ in range(n):
            t = empty(nbytes, dtype=uint8, device="cuda")
            del t
    return run



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    import torch

    from bench.results_file import gpu_result, write_result
    from cutegrad.allocator import get_allocator

    torch.cuda.init()
    torch.empty(1, device="cuda")  # PyTorch creates the primary context we then share
    alloc = get_allocator(0)
    stream = int(torch.cuda.current_stream().cuda_stream)

    rows = []
    for nbytes, label in SIZES:
        ours = time_pairs(cutegrad_loop(alloc, nbytes, stream), args.pairs)
        theirs = time_pairs(torch_loop(torch, nbytes), args.pairs)
        rows.append({"name": f"alloc+free {label} (cached)", "unit": "us",
                     "cutegrad": round(ours, 4), "baseline": round(theirs, 4),
                     "baseline_name": "torch.empty + del", "ratio": round(theirs / ours, 3)})
        print(f"{label:>7}: cutegrad {ours:.3f} us   torch {theirs:.3f} us   ratio {theirs / ours:.2f}")
    alloc.check_invariants()

    write_result(gpu_result("allocator", torch, rows, argv), args.out, "allocator")


if __name__ == "__main__":
    main()
