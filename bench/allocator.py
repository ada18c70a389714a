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
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
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


def gpu_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    import torch
    from cuda.bindings import driver as cu

    import cutegrad
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

    device = torch.cuda.get_device_name(0)
    api = cu.cuDriverGetVersion()[1]
    driver = f"CUDA driver API {api // 1000}.{api % 1000 // 10}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            driver = f"{smi.stdout.strip()} ({driver})"
    except (OSError, subprocess.TimeoutExpired):
        pass  # the API version alone still identifies the driver generation
    result = {
        "device": device,
        "driver": driver,
        "versions": {"cutegrad": getattr(cutegrad, "__version__", "unknown"),
                     "python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.allocator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"allocator-{gpu_slug(device)}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
