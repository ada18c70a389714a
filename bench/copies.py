"""Strided copies and the SIMT (fp32) GEMM: cutegrad vs PyTorch on the same GPU.

    python -m bench.copies [--iters 50] [--reps 7] [--out bench/results]

Copies: a contiguous copy, the attention permutes (B, T, H, D) -> (B, H, T, D)
and (B, T, 3, H, D) -> (3, B, H, T, D) at the vit workload's size, a 2-D
transpose and a permute with a cast, in fp32 and bf16; `contiguous()` (or
`.to(dtype)`) of the same view in both libraries.  GEMMs: fp32 4096x36x128 (a
classifier head) and 4096^3, which cutegrad runs on the tiled SIMT kernel
(there is no tf32 path; torch's fp32 matmul is cuBLAS with tf32 off, its
default).  Both libraries launch on the legacy default stream; one pair of
CUDA events brackets `iters` back-to-back calls, the figure is the median over
`reps` such batches (ms per call).  GB/s counts bytes read plus written.
Writes bench/results/copies-<gpu>.json (DESIGN.md's schema; ratio = torch
time / cutegrad time, above 1 means cutegrad is faster).
"""

import argparse
import os
import statistics

COPY_CASES = [
    # (name, shape, view as a function of (tensor, library), cast to bf16)
    ("contiguous copy (256,80,256)", (256, 80, 256), lambda t: t.clone(), False),
    ("permute(0,2,1,3) of (256,80,8,32)", (256, 80, 8, 32), lambda t: t.permute(0, 2, 1, 3).contiguous(), False),
    ("permute(2,0,3,1,4) of (256,80,3,8,32)", (256, 80, 3, 8, 32),
     lambda t: t.permute(2, 0, 3, 1, 4).contiguous(), False),
    ("transpose of (8192,768)", (8192, 768), lambda t: t.t().contiguous(), False),
    ("transpose+cast to bf16 of (8192,768)", (8192, 768), None, True),
]
GEMM_CASES = [(4096, 36, 128), (4096, 4096, 4096)]


def time_ms(fn, sync_event, iters, reps):
    """Median over reps of (CUDA-event time of `iters` calls) / iters."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        start, stop = sync_event(), sync_event()
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / iters)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    import torch

    import cutegrad
    from bench.results_file import gpu_result, write_result

    torch.empty(1, device="cuda")  # PyTorch creates the primary context cutegrad shares
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 SGEMM against an fp32 SGEMM
    event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    rows = []
    print(f"{'case':<48} {'cutegrad ms':>12} {'torch ms':>10} {'ratio':>7} {'cutegrad GB/s':>14} {'torch GB/s':>11}")

    def record(name, ours, theirs, nbytes=None, flops=None):
        row = {"name": name, "unit": "ms", "cutegrad": round(ours, 5), "baseline": round(theirs, 5),
               "baseline_name": "PyTorch eager (same GPU)", "ratio": round(theirs / ours, 3)}
        extra = ""
        if nbytes is not None:
            row["cutegrad_gbps"] = round(nbytes / ours / 1e6, 1)
            row["baseline_gbps"] = round(nbytes / theirs / 1e6, 1)
            extra = f" {row['cutegrad_gbps']:14.1f} {row['baseline_gbps']:11.1f}"
        if flops is not None:
            row["cutegrad_tflops"] = round(flops / ours / 1e9, 2)
            row["baseline_tflops"] = round(flops / theirs / 1e9, 2)
            extra = f"   {row['cutegrad_tflops']:.2f} vs {row['baseline_tflops']:.2f} TFLOP/s"
        rows.append(row)
        print(f"{name:<48} {ours:12.4f} {theirs:10.4f} {row['ratio']:7.3f}{extra}", flush=True)

    for name, shape, view, cast in COPY_CASES:
        for dtype_name in (("fp32",) if cast else ("fp32", "bf16")):
            c_dtype = cutegrad.float32 if dtype_name == "fp32" else cutegrad.bfloat16
            t_dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
            x_c = cutegrad.randn(*shape, device="cuda").to(c_dtype)
            x_t = torch.randn(*shape, device="cuda").to(t_dtype)
            if cast:
                fn_c = lambda: x_c.t().to(cutegrad.bfloat16)  # noqa: E731
                fn_t = lambda: x_t.t().to(torch.bfloat16)  # noqa: E731
                out_size = 2
            else:
                fn_c = lambda: view(x_c)  # noqa: E731
                fn_t = lambda: view(x_t)  # noqa: E731
                out_size = x_t.element_size()
            # check the copy before timing it (same values as a host-side reference)
            if not cast:
                ref = view(torch.from_numpy(x_c.cpu().to(cutegrad.float32).numpy())).numpy()
                got = fn_c().to(cutegrad.float32).cpu().numpy()
                if not (got == ref).all():
                    raise SystemExit(f"bench.copies: cutegrad's {name} ({dtype_name}) gave wrong values")
            numel = x_t.numel()
            nbytes = numel * (x_t.element_size() + out_size)
            ours = time_ms(fn_c, event, args.iters, args.reps)
            theirs = time_ms(fn_t, event, args.iters, args.reps)
            record(f"{name} {dtype_name}", ours, theirs, nbytes=nbytes)
            del x_c, x_t

    for m, n, k in GEMM_CASES:
        a_c, b_c = cutegrad.randn(m, k, device="cuda"), cutegrad.randn(k, n, device="cuda")
        a_t, b_t = torch.randn(m, k, device="cuda"), torch.randn(k, n, device="cuda")
        iters = max(1, args.iters // 10) if m * n * k > 1e9 else args.iters
        ours = time_ms(lambda: cutegrad.matmul(a_c, b_c), event, iters, args.reps)
        theirs = time_ms(lambda: torch.matmul(a_t, b_t), event, iters, args.reps)
        record(f"fp32 GEMM {m}x{n}x{k} (SIMT vs cuBLAS, tf32 off)", ours, theirs, flops=2.0 * m * n * k)

    write_result(gpu_result("copies", torch, rows, argv), args.out, "copies")


if __name__ == "__main__":
    main()
