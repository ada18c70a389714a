"""Fused attention: cutegrad's F.scaled_dot_product_attention against torch SDPA on one GPU.

    python -m bench.attention [--reps 20] [--only substring]

For each case, forward and (where listed) forward+backward, bf16: TFLOP/s of
cutegrad (fused CuTeDSL kernels where the dispatcher takes them) and of torch
SDPA with the cuDNN and the flash backends (the faster of the two is the
baseline), timed with CUDA events on the legacy default stream, which both
libraries use here.  FLOPs: 4 * B * H * Sq * Sk * D for the forward (half of
it causal), 2.5 times that again for the backward.  Results go to
bench/results/attention-<gpu>.json in the schema of DESIGN.md; the row says
which path cutegrad took (and why, when it fell back).
"""
import argparse
import os
import statistics

from bench.results_file import gpu_result, write_result

# (name, B, H, S, D, causal, passes)
CASES = [
    ("long", 4, 16, 4096, 128, False, ("fwd", "fwd+bwd")),
    ("long", 4, 16, 4096, 128, True, ("fwd", "fwd+bwd")),
    ("mid", 8, 16, 2048, 64, False, ("fwd", "fwd+bwd")),
    ("short", 64, 6, 256, 64, True, ("fwd+bwd",)),
    ("short", 256, 6, 65, 64, False, ("fwd+bwd",)),
    ("reverse", 64, 4, 64, 32, True, ("fwd", "fwd+bwd")),
    ("vit", 256, 8, 80, 32, False, ("fwd", "fwd+bwd")),
    ("minigpt", 64, 8, 128, 32, True, ("fwd", "fwd+bwd")),
    ("gpt2-small", 8, 12, 1024, 64, True, ("fwd", "fwd+bwd")),
]


def attention_flops(B, H, S, D, causal, passes):
    fwd = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return fwd * (3.5 if passes == "fwd+bwd" else 1.0)


def time_ms(torch, fn, reps):
    """Median time of one call: each rep times a batch of calls sized to ~5 ms."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, min(200, int(5.0 / max(start.elapsed_time(end), 1e-3))))
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def torch_baseline(torch, q, k, v, causal, passes, reps):
    """(ms, backend name) of the faster of torch's cuDNN and flash SDPA backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    best = None
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def call():
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                if passes == "fwd+bwd":
                    out.backward(out)
        try:
            ms = time_ms(torch, call, reps)
        except RuntimeError:  # this backend does not take the shape
            continue
        if best is None or ms < best[0]:
            best = (ms, backend.name)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", default="", help="substring filter on case names")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    import numpy as np
    import torch

    import cutegrad as cg
    import cutegrad.nn.functional as F
    from cutegrad import _C
    from cutegrad.backends.cuda import attention as backend
    from cutegrad.ops import attention as A

    _C.load_kernels()
    rows = []
    for name, B, H, S, D, causal, passes_list in CASES:
        for passes in passes_list:
            label = f"{name} B{B} H{H} S{S} D{D} {'causal' if causal else 'full'} {passes}"
            if args.only and args.only not in label:
                continue
            rng = np.random.default_rng(0)
            host = [rng.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(3)]
            grad = passes == "fwd+bwd"
            q, k, v = (cg.tensor(a, dtype=cg.bfloat16).to("cuda").requires_grad_(grad) for a in host)
            path, why = A.sdpa_path(q, k, v, None, 0.0, causal, False, A.flash_caps(q._storage.device), grad)

            def ours():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                if grad:
                    out.backward(out)

            tq, tk, tv = (torch.tensor(a, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for a in host)
            ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            got = F.scaled_dot_product_attention(q, k, v, is_causal=causal).detach().to(cg.float32).cpu().numpy()
            err = float(np.abs(got - ref.detach().float().cpu().numpy()).max())
            if not err < 5e-2:
                # kept in the results (and the exit status), not timed: a wrong kernel has no speed
                rows.append({"name": label, "error": f"cutegrad result wrong (max abs error {err:.3e} vs torch)"})
                print(f"{label:<48} {rows[-1]['error']}", flush=True)
                continue
            flops = attention_flops(B, H, S, D, causal, passes)
            t_ours = time_ms(torch, ours, args.reps)
            t_base, base_name = torch_baseline(torch, tq, tk, tv, causal, passes, args.reps)
            mine, theirs = flops / t_ours / 1e9, flops / t_base / 1e9
            rows.append({"name": label, "unit": "TFLOP/s", "cutegrad": round(mine, 2), "baseline": round(theirs, 2),
                         "baseline_name": f"torch SDPA ({base_name})", "ratio": round(mine / theirs, 4),
                         "ms": round(t_ours, 4), "baseline_ms": round(t_base, 4),
                         "path": f"flash: {backend.last_kernel()}" if path == "flash" else f"composite: {why}"})
            print(f"{label:<48} {mine:8.1f} {theirs:8.1f} {mine / theirs:6.3f}  {rows[-1]['path']}", flush=True)
    write_result(gpu_result("attention", torch, rows), args.out, "attention")
    wrong = [r["name"] for r in rows if "error" in r]
    if wrong:
        raise SystemExit(f"wrong results (not timed): {', '.join(wrong)}")


if __name__ == "__main__":
    main()
