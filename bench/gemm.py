"""GEMM benchmark: cutegrad._C.gemm vs cuBLAS (torch.matmul), same process, same GPU.

    python -m bench.gemm [--reps 30] [--out bench/results]

Shapes: the forward (Y = X W^T), input-gradient (dX = dY W) and weight-gradient
(dW = dY^T X) GEMM of every Linear in the four reference workloads of
DESIGN.md, plus 4096^3 and 8192^3, bf16.  The classifier heads (N = 10 and
36) are the narrow cases.  Each GEMM runs in the operand layouts a
Linear really has (no transposes) for both libraries.  Extra rows (not in the
geomean): the MLP's first Linear with the bias+GELU epilogue fused (and with
the pre-activation stored for the backward), against torch.addmm + gelu; and
fp32 GEMMs: full fp32 against cuBLAS fp32 (TF32 off), and the "high" (TF32
wgmma; in the weight-gradient layout with the two K-major operand copies the
backend makes) and "medium" (operands rounded to bf16) float32 matmul
precisions, tensor cores with fp32 output, against cuBLAS TF32; and the host time of one
`_C.gemm` call against torch.matmul's.  Timing: CUDA events
around a batch of launches, median over reps; small problems rotate through
enough input copies to defeat the L2 cache.  Writes
bench/results/gemm-<gpu>.json (DESIGN.md's schema) and gemm-<gpu>.md.
torch is the baseline (and the allocator here) only; cutegrad never needs it.
"""

import argparse
import json
import math
import os
import statistics

from bench.results_file import gpu_result

# (workload, tokens per step, [(linear name, in features, out features[, rows when not the tokens])])
# vit: 256 images of 64 patches + 16 class tokens; the patch embedding sees the 64 patches, the
# head one pooled row per image.
WORKLOADS = [
    ("reverse", 64 * 64, [("qkv", 128, 384), ("proj", 128, 128), ("fc1", 128, 512), ("fc2", 512, 128), ("head", 128, 36)]),
    ("vit", 256 * 80, [("patch", 48, 256, 256 * 64), ("qkv", 256, 768), ("proj", 256, 256), ("fc1", 256, 1024),
                       ("fc2", 1024, 256), ("head", 256, 10, 256)]),
    ("minigpt", 64 * 128, [("qkv", 256, 768), ("proj", 256, 256), ("fc1", 256, 1024), ("fc2", 1024, 256),
                           ("head", 256, 4096)]),
    ("gpt2-small", 8 * 1024, [("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768),
                              ("head", 768, 50304)]),
]
L2_DEFEAT_BYTES = 160 << 20


def workload_linears():
    """(workload, linear name, rows, in features, out features) of every Linear in WORKLOADS."""
    for wl, tokens, linears in WORKLOADS:
        for lin, fin, fout, *rows in linears:
            yield wl, lin, rows[0] if rows else tokens, fin, fout


def gemm_cases():
    """(name, M, N, K, a_major, b_major, is_workload): plain GEMMs."""
    cases = []
    for wl, lin, m, fin, fout in workload_linears():
        cases.append((f"{wl}.{lin}.fwd", m, fout, fin, "k", "k", True))
        cases.append((f"{wl}.{lin}.dgrad", m, fin, fout, "k", "n", True))
        cases.append((f"{wl}.{lin}.wgrad", fout, fin, m, "m", "n", True))
    for s in (4096, 8192):
        cases.append((f"square.{s}", s, s, s, "k", "k", False))
    return cases


def make_operands(torch, m, n, k, a_major, b_major, dtype):
    """A (M x K) and B (K x N) as torch views with the requested unit-stride axis."""
    a = torch.randn(m, k, device="cuda", dtype=dtype) if a_major == "k" else torch.randn(k, m, device="cuda", dtype=dtype).t()
    b = torch.randn(n, k, device="cuda", dtype=dtype).t() if b_major == "k" else torch.randn(k, n, device="cuda", dtype=dtype)
    return a, b


def time_ms(torch, fn, sets, reps):
    """Median per-call time: each rep times a batch of calls cycling over the input sets."""
    inner = max(len(sets), 1)
    for s in sets[: min(3, len(sets))]:
        fn(*s)
    torch.cuda.synchronize()
    # Size the batch so one rep is ~2 ms of GPU time.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(inner):
        fn(*sets[i % len(sets)])
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end) / inner, 1e-4)
    inner = max(inner, min(2000, int(2.0 / per_call)))
    samples = []
    for _ in range(reps):
        start.record()
        for i in range(inner):
            fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


FP32_CASES = [("reverse.head.fwd", 64 * 64, 36, 128), ("vit.head.fwd", 256, 10, 256),
              ("vit.fc1.fwd", 256 * 80, 1024, 256), ("minigpt.fc2.fwd", 64 * 128, 256, 1024), ("square.4096", 4096, 4096, 4096),
              ("gpt2-small.fc1.wgrad", 3072, 768, 8 * 1024)]


def fp32_rows(torch, gemm, stream, args):
    """fp32 GEMMs (forward layout; the wgrad case in the weight-gradient layout): full fp32 vs
    cuBLAS with TF32 off; the "high" (TF32 wgmma; MN-major operands copied K-major first, as the
    backend does) and "medium" (bf16-rounded operands) paths on tensor cores with fp32 output,
    their copy / cast kernels included, vs cuBLAS TF32."""
    rows = []
    for name, m, n, k in FP32_CASES:
        for mode in ("highest", "high", "medium"):
            label = f"fp32-{mode}.{name}"
            if args.only and args.only not in label:
                continue
            wgrad = name.endswith(".wgrad")
            a, b = make_operands(torch, m, n, k, "m" if wgrad else "k", "n" if wgrad else "k", torch.float32)
            d = torch.empty(m, n, device="cuda", dtype=torch.float32)
            a16, b16 = torch.empty(m, k, device="cuda", dtype=torch.bfloat16), torch.empty(n, k, device="cuda", dtype=torch.bfloat16).t()
            a_k, b_k = torch.empty(m, k, device="cuda"), torch.empty(n, k, device="cuda").t()  # K-major copies

            def one(x, y, dn, m=m, n=n, k=k, d=d):
                return gemm(x.data_ptr(), (1, m, k), (0, x.stride(0), x.stride(1)), y.data_ptr(), (1, k, n),
                            (0, y.stride(0), y.stride(1)), d.data_ptr(), (1, m, n), (0, d.stride(0), 1),
                            dn, "fp32", stream=stream)

            def ours_call(mode=mode, a=a, b=b, a16=a16, b16=b16, a_k=a_k, b_k=b_k, wgrad=wgrad):
                if mode == "highest":
                    return one(a, b, "fp32")
                if mode == "medium":
                    a16.copy_(a)
                    b16.copy_(b)
                    return one(a16, b16, "bf16")
                if wgrad:  # TF32 reads both operands K-major: the backend copies them first
                    a_k.copy_(a)
                    b_k.copy_(b)
                    return one(a_k, b_k, "tf32")
                return one(a, b, "tf32")

            def theirs_call(a=a, b=b, d=d):
                torch.matmul(a, b, out=d)

            kernel = ours_call()
            ref = torch.matmul(a.double(), b.double())
            err = ((d.double() - ref).abs().max() / ref.abs().max()).item()
            if not err < {"highest": 1e-5, "high": 4e-3, "medium": 1e-2}[mode]:
                raise SystemExit(f"{label}: cutegrad result wrong (relative error {err:.2e})")
            flops = 2.0 * m * n * k
            ours = flops / time_ms(torch, lambda: ours_call(), [()], args.reps) / 1e9
            torch.backends.cuda.matmul.allow_tf32 = mode != "highest"
            try:
                theirs = flops / time_ms(torch, lambda: theirs_call(), [()], args.reps) / 1e9
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
            rows.append({"name": f"{label} M={m} N={n} K={k}", "unit": "TFLOP/s", "cutegrad": round(ours, 2),
                         "baseline": round(theirs, 2),
                         "baseline_name": "cuBLAS fp32" if mode == "highest" else "cuBLAS TF32",
                         "ratio": round(ours / theirs, 4), "kernel": kernel, "workload": False})
            print(f"{rows[-1]['name']:<52} {ours:8.1f} {theirs:8.1f} {ours / theirs:6.3f}  {kernel}", flush=True)
    return rows


def host_cost_row(torch, _C, stream, calls=20000):
    """Host time of one `_C.gemm` call (integer codes, device given: what the CUDA backend
    issues) against torch.matmul(out=) on the same tiny GEMM, launches not waited for."""
    import time

    m = n = k = 64
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    dev = torch.cuda.current_device()
    args = (a.data_ptr(), (1, m, k), (m * k, k, 1), b.data_ptr(), (1, k, n), (k * n, 1, k), d.data_ptr(),
            (1, m, n), (m * n, n, 1), 0, 0, 0, 0, 0, None, False, stream, 0, 0, 0, dev)

    def per_call(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t0
        torch.cuda.synchronize()
        return elapsed / calls * 1e6

    ours = per_call(lambda: _C.gemm(*args))
    theirs = per_call(lambda: torch.matmul(a, b, out=d))
    row = {"name": "host.gemm_call 64x64x64 bf16", "unit": "us per call", "cutegrad": round(ours, 3),
           "baseline": round(theirs, 3), "baseline_name": "torch.matmul(out=) host time", "ratio": round(theirs / ours, 4),
           "kernel": _C.gemm(*args), "workload": False}
    print(f"{row['name']:<52} {ours:8.2f} {theirs:8.2f} {row['ratio']:6.3f}  us/call", flush=True)
    return row


def gemm_gpu_slug(name):
    """The short device name of the GEMM results files (gemm-h100.json, gemm-h200.json)."""
    words = [w for w in name.lower().replace("nvidia", "").split() if w]
    return words[0] if words else "gpu"


def main():
    parser = argparse.ArgumentParser(description="cutegrad GEMM vs cuBLAS")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--only", default="", help="substring filter on case names")
    args = parser.parse_args()

    import torch

    from cutegrad import _C
    from cutegrad._gemm import gemm

    _C.load_kernels()
    dtype, dname = torch.bfloat16, "bf16"
    stream = torch.cuda.current_stream().cuda_stream
    rows, used = [], {}
    for name, m, n, k, a_major, b_major, is_workload in gemm_cases():
        if args.only and args.only not in name:
            continue
        bytes_per_set = 2 * (m * k + k * n + m * n)
        nsets = max(1, min(32, math.ceil(L2_DEFEAT_BYTES / bytes_per_set)))
        sets = []
        for _ in range(nsets):
            a, b = make_operands(torch, m, n, k, a_major, b_major, dtype)
            sets.append((a, b, torch.empty(m, n, device="cuda", dtype=dtype)))

        def cutegrad_call(a, b, d):
            return gemm(a.data_ptr(), (1, m, k), (0, a.stride(0), a.stride(1)), b.data_ptr(), (1, k, n),
                        (0, b.stride(0), b.stride(1)), d.data_ptr(), (1, m, n), (0, d.stride(0), 1),
                        dname, dname, stream=stream)

        def cublas_call(a, b, d):
            torch.matmul(a, b, out=d)

        a, b, d = sets[0]
        used[name] = cutegrad_call(a, b, d)
        ref = torch.matmul(a.float(), b.float())
        err = ((d.float() - ref).abs().max() / ref.abs().max()).item()
        if not err < 1e-2:
            raise SystemExit(f"{name}: cutegrad result wrong (relative error {err:.2e})")
        flops = 2.0 * m * n * k
        t_ours = time_ms(torch, cutegrad_call, sets, args.reps)
        t_cublas = time_ms(torch, cublas_call, sets, args.reps)
        ours, theirs = flops / t_ours / 1e9, flops / t_cublas / 1e9
        rows.append({"name": f"{name} M={m} N={n} K={k} {dname}", "unit": "TFLOP/s", "cutegrad": round(ours, 2),
                     "baseline": round(theirs, 2), "baseline_name": "cuBLAS (torch.matmul)",
                     "ratio": round(ours / theirs, 4), "kernel": used[name], "workload": is_workload})
        print(f"{rows[-1]['name']:<52} {ours:8.1f} {theirs:8.1f} {ours / theirs:6.3f}  {used[name]}", flush=True)
        del sets

    # Fused epilogue: the MLP's first Linear + GELU in one kernel vs PyTorch's
    # addmm (cuBLAS, bias fused) followed by a separate GELU kernel.
    for wl, lin, m, k, n in workload_linears():
        if lin != "fc1":
            continue
        for epilogue in ("bias_gelu", "bias_gelu_aux"):
            name = f"{wl}.fc1.fwd+{epilogue}"
            if args.only and args.only not in name:
                continue
            nsets = max(1, min(32, math.ceil(L2_DEFEAT_BYTES / (2 * (m * k + k * n + 3 * m * n)))))
            sets = []
            for _ in range(nsets):
                a, b = make_operands(torch, m, n, k, "k", "k", dtype)
                sets.append((a, b, torch.randn(n, device="cuda", dtype=dtype),
                             torch.empty(m, n, device="cuda", dtype=dtype), torch.empty(m, n, device="cuda", dtype=dtype)))

            def fused_call(a, b, bias, d, aux, epilogue=epilogue):
                store = epilogue == "bias_gelu_aux"
                return gemm(a.data_ptr(), (1, m, k), (0, a.stride(0), a.stride(1)), b.data_ptr(), (1, k, n),
                            (0, b.stride(0), b.stride(1)), d.data_ptr(), (1, m, n), (0, d.stride(0), 1),
                            dname, dname, epilogue=epilogue, bias=bias.data_ptr(), aux=aux.data_ptr() if store else 0,
                            aux_strides=(m * n, n, 1) if store else None, stream=stream)

            def torch_call(a, b, bias, d, aux):
                torch.nn.functional.gelu(torch.addmm(bias, a, b), approximate="tanh")

            a, b, bias, d, aux = sets[0]
            kernel = fused_call(a, b, bias, d, aux)
            pre = torch.addmm(bias.float(), a.float(), b.float())
            ref = torch.nn.functional.gelu(pre, approximate="tanh")
            err = ((d.float() - ref).abs().max() / ref.abs().max()).item()
            if epilogue == "bias_gelu_aux":
                err = max(err, ((aux.float() - pre).abs().max() / pre.abs().max()).item())
            if not err < 1e-2:
                raise SystemExit(f"{name}: cutegrad result wrong (relative error {err:.2e})")
            flops = 2.0 * m * n * k
            ours = flops / time_ms(torch, fused_call, sets, args.reps) / 1e9
            theirs = flops / time_ms(torch, torch_call, sets, args.reps) / 1e9
            rows.append({"name": f"{name} M={m} N={n} K={k} {dname}", "unit": "TFLOP/s", "cutegrad": round(ours, 2),
                         "baseline": round(theirs, 2), "baseline_name": "torch addmm + gelu(tanh)",
                         "ratio": round(ours / theirs, 4), "kernel": kernel, "workload": False})
            print(f"{rows[-1]['name']:<52} {ours:8.1f} {theirs:8.1f} {ours / theirs:6.3f}  {kernel}", flush=True)
            del sets

    rows += fp32_rows(torch, gemm, stream, args)
    if not args.only or "host" in args.only:
        rows.append(host_cost_row(torch, _C, stream))

    result = gpu_result("gemm", torch, rows)
    device = result["device"]
    workload = [r["ratio"] for r in rows if r["workload"]]
    geo = math.exp(sum(map(math.log, workload)) / len(workload)) if workload else float("nan")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"gemm-{gemm_gpu_slug(device)}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# GEMM: cutegrad vs cuBLAS on {device}\n\n")
        f.write(f"{result['date']}, driver {result['driver']}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                f"`{result['command']}`. bf16 in/out, fp32 accumulate. TFLOP/s, median of {args.reps} reps.\n\n")
        f.write(f"Geometric-mean ratio over the workload shapes: **{geo:.3f}**\n\n")
        f.write("| shape | cutegrad | baseline | ratio | baseline is | kernel |\n|---|---:|---:|---:|---|---|\n")
        for r in rows:
            f.write(f"| {r['name']} | {r['cutegrad']:.1f} | {r['baseline']:.1f} | {r['ratio']:.3f} | "
                    f"{r['baseline_name']} | {r['kernel']} |\n")
    print(f"geomean ratio (workload shapes) {geo:.3f}; wrote {base}.json and .md")


if __name__ == "__main__":
    main()
