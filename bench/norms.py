"""Fused add+norm (kernels/cute/norms.py), its backward and cross-entropy: cutegrad vs
PyTorch and vs copy bandwidth, same process, same GPU.

    python -m bench.norms [--reps 50] [--out bench/results]

Cases (bf16 under autocast: bf16 branch output, fp32 residual stream, bf16 normed
output, fp32 master weights), rows x n of (65536, 768), (8192, 768), (16384, 256):
- add+LayerNorm and add+RMSNorm forward: cutegrad's backend kernel entry against
  torch's `x + residual` then `layer_norm` (fp32, as torch's autocast runs it)
  and a cast to bf16 -- the same three outputs;
- their backward (ds in both dtypes, dweight, dbias) against torch's
  `native_layer_norm_backward` plus the residual add and the cast;
- cross-entropy forward+backward over (8192, 50304) bf16 logits against
  `torch.nn.functional.cross_entropy` (one launch each side where possible).
Each norm row also reports GB/s: the bytes the kernel must move (inputs read
once, outputs written once) over its time, next to a device-to-device copy of
the same bytes (`copy GB/s` row) -- issue 11's target is 80% of it.

Timing: bench.reductions.time_us (a stream hold so host time does not leak in,
inputs rotated to defeat L2, median of 7 batches).  Writes
bench/results/norms-<gpu>.json (ratio = torch time / cutegrad time).
"""

from __future__ import annotations

import argparse
import os

SHAPES = ((65536, 768), (8192, 768), (16384, 256))
CE_SHAPE = (8192, 50304)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    import cutegrad
    from bench.reductions import copies_for, time_us
    from bench.results_file import gpu_result, write_result
    from cutegrad import dtypes as dt
    from cutegrad.device import CUDA
    from cutegrad.dispatch import kernel

    torch.cuda.init()
    torch.empty(1, device="cuda")  # PyTorch creates the primary context cutegrad then shares
    assert torch.cuda.current_stream().cuda_stream == 0, "both libraries must run on the legacy default stream"
    add_norm = kernel("add_norm").impl[CUDA]
    add_norm_bwd = kernel("add_norm_backward").impl[CUDA]
    rng = np.random.default_rng(0)
    rows = []

    def add(name, ours, theirs, baseline_name, unit="us"):
        rows.append({"name": name, "unit": unit, "cutegrad": round(ours, 3), "baseline": round(theirs, 3),
                     "baseline_name": baseline_name, "ratio": round(theirs / ours, 3)})
        print(f"{name:<58} cutegrad {ours:10.2f}   {baseline_name} {theirs:10.2f}   ratio {theirs / ours:6.2f}",
              flush=True)

    def both(shape, tdtype, cdtype):
        vals = rng.standard_normal(shape).astype(np.float32)
        return torch.from_numpy(vals).cuda().to(tdtype), cutegrad.tensor(vals).to("cuda").to(cdtype)

    for n_rows, n in SHAPES:
        moved_fwd = n_rows * n * (2 + 4 + 4 + 2)  # read x bf16, residual fp32; write residual fp32, y bf16
        moved_bwd = n_rows * n * (2 + 4 + 4 + 4 + 2)  # read dy bf16, s fp32, dres fp32; write ds fp32, dx bf16
        copy_src = torch.empty(moved_fwd // 2, dtype=torch.uint8, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        copy_us = time_us(torch, lambda: copy_dst.copy_(copy_src), [()], args.reps)
        copy_gbs = 2 * copy_src.numel() / copy_us / 1e3
        add(f"copy {copy_src.numel() >> 20} MiB (read+write)", copy_gbs, copy_gbs, "itself", unit="GB/s")
        for rms in (False, True):
            label = "add+rms_norm" if rms else "add+layer_norm"
            sets = []
            for _ in range(copies_for(moved_fwd)):
                xt, xc = both((n_rows, n), torch.bfloat16, dt.bfloat16)
                rt, rc = both((n_rows, n), torch.float32, dt.float32)
                wt, wc = both((n,), torch.float32, dt.float32)
                bt, bc = both((n,), torch.float32, dt.float32)
                sets.append(((xt, rt, wt, bt), (xc, rc, wc, bc)))

            def ours_fwd(t, c, rms=rms):
                xc, rc, wc, bc = c
                add_norm(xc, rc, wc, None if rms else bc, 1e-5, rms, dt.bfloat16)

            def torch_fwd(t, c, rms=rms):
                xt, rt, wt, bt = t
                s = xt + rt
                if rms:
                    torch.nn.functional.rms_norm(s, (n,), wt, 1e-5).to(torch.bfloat16)
                else:
                    torch.nn.functional.layer_norm(s, (n,), wt, bt, 1e-5).to(torch.bfloat16)

            ours = time_us(torch, lambda t, c: ours_fwd(t, c), sets, args.reps)
            theirs = time_us(torch, lambda t, c: torch_fwd(t, c), sets, args.reps)
            add(f"{label} forward {n_rows}x{n} bf16+fp32", ours, theirs, "torch add+norm+cast")
            add(f"{label} forward {n_rows}x{n} GB/s (copy {copy_gbs:.0f})", moved_fwd / ours / 1e3,
                copy_gbs, "copy", unit="GB/s")

            bsets = []
            for (xt, rt, wt, bt), (xc, rc, wc, bc) in sets:
                y, s, mean, rstd = add_norm(xc, rc, wc, None if rms else bc, 1e-5, rms, dt.bfloat16)
                dyt, dyc = both((n_rows, n), torch.bfloat16, dt.bfloat16)
                drt, drc = both((n_rows, n), torch.float32, dt.float32)
                st = xt.float() + rt
                _, mt, rst = torch.ops.aten.native_layer_norm(st, [n], wt, bt, 1e-5)
                bsets.append(((dyt, drt, st, mt, rst, wt, bt), (dyc, drc, s, wc, mean, rstd)))

            def ours_bwd(t, c, rms=rms):
                dyc, drc, s, wc, mean, rstd = c
                add_norm_bwd(dyc, drc, s, wc, mean, rstd, rms, dt.bfloat16, dt.float32, True, not rms)

            def torch_bwd(t, c):
                dyt, drt, st, mt, rst, wt, bt = t
                ds = torch.ops.aten.native_layer_norm_backward(dyt.float(), st, [n], mt, rst, wt, bt,
                                                               [True, True, True])[0]
                (ds + drt).to(torch.bfloat16)

            ours = time_us(torch, lambda t, c: ours_bwd(t, c), bsets, args.reps)
            theirs = time_us(torch, lambda t, c: torch_bwd(t, c), bsets, args.reps)
            add(f"{label} backward {n_rows}x{n} bf16+fp32", ours, theirs, "torch norm bwd+add+cast")
            add(f"{label} backward {n_rows}x{n} GB/s (copy {copy_gbs:.0f})", moved_bwd / ours / 1e3,
                copy_gbs, "copy", unit="GB/s")

    ce = kernel("cross_entropy_rows").impl[CUDA]
    ce_bwd = kernel("cross_entropy_rows_backward").impl[CUDA]
    lt, lc = both(CE_SHAPE, torch.bfloat16, dt.bfloat16)
    tgt = rng.integers(0, CE_SHAPE[1], CE_SHAPE[0])
    tt, tc = torch.from_numpy(tgt).cuda(), cutegrad.tensor(tgt).to("cuda")
    grad_rows = cutegrad.full((CE_SHAPE[0],), 1.0 / CE_SHAPE[0], device="cuda")

    def ours_ce():
        _, lse = ce(lc, tc)
        ce_bwd(lc, tc, lse, grad_rows)

    lt.requires_grad_()

    def torch_ce():
        torch.autograd.grad(torch.nn.functional.cross_entropy(lt.float(), tt), lt)

    ours = time_us(torch, lambda: ours_ce(), [()], args.reps)
    theirs = time_us(torch, lambda: torch_ce(), [()], args.reps)
    add(f"cross_entropy fwd+bwd {CE_SHAPE[0]}x{CE_SHAPE[1]} bf16", ours, theirs, "torch cross_entropy")

    write_result(gpu_result("norms", torch, rows, argv), args.out, "norms")


if __name__ == "__main__":
    main()
