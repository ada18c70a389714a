"""Reduction and norm-backward kernels: cutegrad vs PyTorch, same process, same GPU.

    python -m bench.reductions [--reps 50] [--out bench/results]

Cases are the reductions of a training step (DESIGN.md's workloads): column
sums of (tokens, features) gradients (bias gradients), row sums, full sums
and the layer_norm backward (dx, dweight, dbias) of (20480, 256), in fp32 and
bf16 (sums accumulate and are written in fp32 for bf16 inputs, as autocast
bias gradients are).  cutegrad runs through its CUDA backend's kernel entry
points (the same path as the frontend ops, workspace allocation included);
PyTorch through the matching aten ops.

Timing measures GPU time only: torch.cuda._sleep holds the stream while the
host enqueues an event, `--reps` launches and a second event, so host
overhead (measured by bench.overhead) does not leak in.  Launches rotate
through enough input copies to defeat the L2 cache.  The reported number is
the median over 7 batches of the per-launch time.  Writes
bench/results/reductions-<gpu>.json (DESIGN.md's schema; ratio = torch time /
cutegrad time, above 1 means cutegrad is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

L2_DEFEAT_BYTES = 160 << 20
BATCHES = 7
SLEEP_CYCLES_PER_LAUNCH = 200_000  # ~100 us of stream hold per queued launch: more than a launch's host time



def copies_for(nbytes):
    return max(1, min(16, -(-L2_DEFEAT_BYTES // max(nbytes, 1))))


def time_us(torch, fn, sets, reps):
    """Median over batches of the GPU time per launch (us); fn(args) enqueues one launch."""
    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    samples = []
    for _ in range(BATCHES):
        hold, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        hold.record()
        torch.cuda._sleep(SLEEP_CYCLES_PER_LAUNCH * reps)
        t0 = time.perf_counter()
        start.record()
        for i in range(reps):
            fn(*sets[i % len(sets)])
        end.record()
        host_ms = (time.perf_counter() - t0) * 1000.0
        end.synchronize()
        # If the host was still enqueueing when the hold ended, the GPU waited
        # on it and the sample includes host time: say so.
        if host_ms > hold.elapsed_time(start):
            print(f"    note: enqueueing took {host_ms:.2f} ms, longer than the {hold.elapsed_time(start):.2f} ms "
                  "hold; this sample is host-bound", file=sys.stderr)
        samples.append(start.elapsed_time(end) * 1000.0 / reps)
    return statistics.median(samples)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    import cutegrad
    from bench.results_file import gpu_result, write_result
    from cutegrad import dtypes as dt
    from cutegrad.device import CUDA
    from cutegrad.dispatch import kernel
    from cutegrad.ops import codes as C
    from cutegrad.backends.cuda import layer_norm_backward

    torch.cuda.init()
    torch.empty(1, device="cuda")  # PyTorch creates the primary context cutegrad then shares
    assert torch.cuda.current_stream().cuda_stream == 0, "both libraries must run on the legacy default stream"
    reduce_impl = kernel("reduce").impl[CUDA]
    ln_impl = kernel("layer_norm").impl[CUDA]
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cdt = {"fp32": dt.float32, "bf16": dt.bfloat16}
    rng = np.random.default_rng(0)

    def pair(shape, dname):
        """The same values as a torch tensor and a cutegrad tensor (separate memory)."""
        vals = rng.standard_normal(shape).astype(np.float32)
        t = torch.from_numpy(vals).to("cuda").to(tdt[dname])
        c = cutegrad.tensor(vals).to("cuda").to(cdt[dname])
        return t, c

    rows = []

    def add(name, ours, theirs, baseline_name):
        rows.append({"name": name, "unit": "us", "cutegrad": round(ours, 3), "baseline": round(theirs, 3),
                     "baseline_name": baseline_name, "ratio": round(theirs / ours, 3)})
        print(f"{name:<44} cutegrad {ours:9.2f} us   torch {theirs:9.2f} us   ratio {theirs / ours:6.2f}", flush=True)

    reduce_cases = [
        ("column sum", (20480, 256), (0,)),
        ("column sum", (8192, 768), (0,)),
        ("column sum", (8192, 3072), (0,)),
        ("row sum", (20480, 256), (1,)),
        ("row sum", (8192, 768), (1,)),
        ("mean over dim 1 of", (256, 80, 256), (1,)),
        ("full sum", (1 << 24,), (0,)),
        ("full sum", (20480, 256), (0, 1)),
    ]
    for label, shape, dims in reduce_cases:
        for dname in ("fp32", "bf16"):
            nbytes = int(np.prod(shape)) * (4 if dname == "fp32" else 2)
            sets = [pair(shape, dname) for _ in range(copies_for(nbytes))]
            code = C.MEAN if label.startswith("mean") else C.SUM
            # sums of bf16 gradients are taken in fp32 (autocast's bias gradients); the mean keeps the dtype
            out_c = cdt[dname] if code == C.MEAN else dt.float32
            out_t = tdt[dname] if code == C.MEAN else torch.float32
            ours = time_us(torch, lambda t, c: reduce_impl(code, c, dims, False, out_c), sets, args.reps)
            if code == C.MEAN:
                theirs = time_us(torch, lambda t, c: torch.mean(t, dims), sets, args.reps)
            else:
                theirs = time_us(torch, lambda t, c: torch.sum(t, dims, dtype=out_t), sets, args.reps)
            add(f"{label} {'x'.join(map(str, shape))} dims {list(dims)} {dname}", ours, theirs,
                "torch.mean" if code == C.MEAN else "torch.sum")

    for rows_, n in [(20480, 256), (8192, 768)]:
        for dname in ("fp32", "bf16"):
            nbytes = rows_ * n * (4 if dname == "fp32" else 2) * 3
            sets = []
            for _ in range(copies_for(nbytes)):
                xt, xc = pair((rows_, n), dname)
                dyt, dyc = pair((rows_, n), dname)
                w = np.random.default_rng(1).uniform(0.5, 1.5, n).astype(np.float32)
                b = np.zeros(n, np.float32)
                wt, bt = torch.from_numpy(w).cuda(), torch.from_numpy(b).cuda()
                wc, bc = cutegrad.tensor(w).to("cuda"), cutegrad.tensor(b).to("cuda")  # fp32 master weights
                _, mt, rt = torch.ops.aten.native_layer_norm(xt, [n], wt.to(xt.dtype), bt.to(xt.dtype), 1e-5)
                _, mc, rc = ln_impl(xc, 1, wc, bc, 1e-5)
                sets.append(((dyt, xt, mt, rt, wt.to(xt.dtype), bt.to(xt.dtype)), (dyc, xc, mc, rc, wc)))

            def ours_fn(t, c):
                dyc, xc, mc, rc, wc = c
                layer_norm_backward(dyc, xc, 1, wc, mc, rc)

            def torch_fn(t, c):
                dyt, xt, mt, rt, wt, bt = t
                torch.ops.aten.native_layer_norm_backward(dyt, xt, [n], mt, rt, wt, bt, [True, True, True])

            ours = time_us(torch, ours_fn, sets, args.reps)
            theirs = time_us(torch, torch_fn, sets, args.reps)
            add(f"layer_norm backward {rows_}x{n} {dname}", ours, theirs, "aten.native_layer_norm_backward")

    write_result(gpu_result("reductions", torch, rows, argv), args.out, "reductions")


if __name__ == "__main__":
    main()
