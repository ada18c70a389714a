"""Host overhead per op: cutegrad vs PyTorch on the same device (CPU or one GPU).

Small operands make the measured time mostly framework overhead (argument
checks, dispatch, dtype promotion, output Tensor construction) rather than
arithmetic, which is the cost that decides eager speed on a GPU, where the
kernel runs asynchronously. Each figure is the median over REPEATS batches of
the mean time of BATCH back-to-back calls, after a warm-up; cutegrad's and
PyTorch's batches alternate so that a shared machine's load hits both alike.
On a GPU the calls only queue kernels: the time is the host's cost of issuing
one op (checks, dispatch, allocation of the output, the launch). The device is
synchronized between batches, outside the timed region, so a full launch
queue never stalls the host inside a measurement.

    python -m bench.overhead [--device cpu|cuda] [--repeats N] [--batch N] [--out DIR]

prints a table and writes bench/results/overhead-cpu.json or
overhead-<gpu>.json (DESIGN.md's results schema; `ratio` > 1 means cutegrad
has the lower overhead).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _batch_us(fn, batch, sync):
    sync()
    t0 = time.perf_counter_ns()
    for _ in range(batch):
        fn()
    elapsed = time.perf_counter_ns() - t0
    sync()
    return elapsed / batch / 1e3


def paired_median_us(fns, repeats, batch, syncs=None):
    """(median, min) microseconds per call of each fn. Batches of the fns
    alternate, so load from other processes on a shared machine hits them
    alike; the minimum is the figure least disturbed by that load. syncs[i]
    waits for fns[i]'s device work, between batches."""
    syncs = syncs or [lambda: None] * len(fns)
    for fn, sync in zip(fns, syncs):  # warm-up: caches, lazy imports, allocator pools
        _batch_us(fn, batch, sync)
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, sync, out in zip(fns, syncs, samples):
            out.append(_batch_us(fn, batch, sync))
    return [(statistics.median(s), min(s)) for s in samples]


def cases(mod, F, device="cpu"):
    """(name, zero-argument callable) per op, for module `mod` (cutegrad or torch), on `device`."""
    rng = np.random.default_rng(0)

    def t(*shape, grad=False):
        arr = rng.standard_normal(shape).astype(np.float32)
        x = mod.tensor(arr).to(device)
        return x.requires_grad_() if grad else x

    a, b = t(32, 32), t(32, 32)
    m1, m2 = t(64, 64), t(64, 64)
    x, w, bias = t(32, 64), t(64), t(64)
    ga, gb = t(32, 32, grad=True), t(32, 32, grad=True)
    return [
        ("add 32x32 fp32", lambda: a + b),
        ("matmul 64x64 fp32", lambda: m1 @ m2),
        ("layer_norm 32x64 fp32", lambda: F.layer_norm(x, (64,), w, bias)),
        ("add 32x32 fp32, recording autograd", lambda: ga + gb),
    ]


def versions(torch, device):
    from bench.results_file import cutegrad_version
    cuda = torch.version.cuda if torch is not None and device == "cuda" else None
    return {"cutegrad": cutegrad_version(), "python": platform.python_version(),
            "torch": torch.__version__ if torch is not None else None, "cuda": cuda}


def main():
    parser = argparse.ArgumentParser(description="host microseconds per op, cutegrad vs PyTorch on one device")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    import cutegrad
    try:
        import torch
        import torch.nn.functional as TF
    except ImportError:
        torch = TF = None

    gpu = args.device == "cuda"
    if gpu and torch is None:
        raise SystemExit("bench.overhead --device cuda compares with PyTorch on the same GPU: torch is not installed")
    if gpu:
        torch.empty(1, device="cuda")  # PyTorch creates the primary context cutegrad shares
    baseline_name = "PyTorch CUDA eager" if gpu else "PyTorch CPU eager"
    ours = cases(cutegrad, cutegrad, args.device)
    theirs = cases(torch, TF, args.device) if torch is not None else [(n, None) for n, _ in ours]
    syncs = [cutegrad.cuda.synchronize, torch.cuda.synchronize] if gpu else None
    rows = []
    print(f"{'op':<38} {'cutegrad us':>12} {'torch us':>10} {'ratio':>7}   (min over batches)")
    for (name, fn), (_, tfn) in zip(ours, theirs):
        if tfn is not None:
            (us, us_min), (base, base_min) = paired_median_us([fn, tfn], args.repeats, args.batch, syncs)
        else:
            ((us, us_min),), base, base_min = paired_median_us([fn], args.repeats, args.batch), None, None
        ratio = round(base / us, 4) if base else None
        rows.append({"name": name, "unit": "us/op (host, median)", "cutegrad": round(us, 2),
                     "baseline": round(base, 2) if base else None, "baseline_name": baseline_name,
                     "ratio": ratio, "cutegrad_min": round(us_min, 2),
                     "baseline_min": round(base_min, 2) if base_min else None})
        print(f"{name:<38} {us:12.2f} {base if base else float('nan'):10.2f} {ratio if ratio else float('nan'):7.3f}"
              f"   (min {us_min:.2f} / {base_min if base_min else float('nan'):.2f})", flush=True)

    from bench.results_file import driver_version, gpu_slug
    device = torch.cuda.get_device_name(0) if gpu else cpu_model()
    result = {
        "device": device,
        "driver": driver_version() if gpu else None,
        "versions": versions(torch, args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.overhead " + " ".join(sys.argv[1:]),
        "threads": {"torch": torch.get_num_threads() if torch is not None else None, "cpus": os.cpu_count()},
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overhead-{gpu_slug(device)}.json" if gpu else "overhead-cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
