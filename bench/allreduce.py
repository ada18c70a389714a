"""All-reduce benchmark: cutegrad's CuTeDSL kernels ("cute" backend) against NCCL (nccl4py), same run, same GPUs.

    python -m bench.allreduce [--nproc 2] [--dtype bf16] [--iters 20] [--out bench/results]

Started without RANK in the environment it relaunches itself with
`cutegrad launch --standalone --nproc-per-node N`.  Every rank joins a "cute"
group (which also holds the NCCL communicator).  For each message size from
4 KiB to 1 GiB (powers of 4, plus 64 MiB and 256 MiB) it times, on rank 0's
view:
- `one_shot` and `two_shot`: our kernel forced to that algorithm (the
  hand-over table is bypassed), and `nccl`: ncclAllReduce, in place, SUM;
- eager: `iters` back-to-back calls between two CUDA events; graphed: the
  same `iters` calls captured into one CUDA graph and replayed;
- latency = time per call (median of 5 repetitions), bus bandwidth =
  2 (W - 1) / W * bytes / latency (NCCL's definition).
Results: bench/results/allreduce-<gpu>.json (DESIGN.md's schema; rows name the
best of our two algorithms against NCCL, ratio = NCCL time / ours), a
Markdown table with every column, the recommended hand-over table for
frontend/distributed/cute_backend.py (where one-shot stops beating
two-shot, where neither beats NCCL), and a chart (allreduce-<gpu>.png) when
matplotlib is installed.  The cross-rank argument checks are off
(CUTEGRAD_DISTRIBUTED_CHECKS=0) so only the collective is timed.
"""
import argparse
import json
import os
import statistics
import sys

SIZES = sorted({4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30})


def _args(argv=None):
    p = argparse.ArgumentParser(description="cute all-reduce vs NCCL")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-bytes", type=int, default=1 << 30)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def _relaunch(args):
    from cutegrad.distributed import launch
    env_argv = ["--standalone", "--nproc-per-node", str(args.nproc), "-m", "bench.allreduce", *sys.argv[1:]]
    os.environ["CUTEGRAD_DISTRIBUTED_CHECKS"] = "0"
    p = argparse.ArgumentParser()
    launch.add_arguments(p)
    return launch.run(p.parse_args(env_argv))


def _time(call, iters, graphed):
    import cutegrad
    from cutegrad import cuda
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    replay = None
    if graphed:
        g = cutegrad.graphs.CUDAGraph()
        with cutegrad.graphs.graph(g):
            for _ in range(iters):
                call()
        replay = g.replay
    samples = []
    for _ in range(6):
        start.record()
        if replay is not None:
            replay()
        else:
            for _ in range(iters):
                call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)  # microseconds per call
    return statistics.median(samples[1:])


def worker(args):
    import cutegrad
    import cutegrad.distributed as dist
    from cutegrad.distributed import process_group
    from cutegrad.distributed.nccl_backend import NcclBackend
    dist.init_process_group("cute")
    g = process_group.default_group("bench")
    backend, world = g.backend, g.world_size
    dtype = {"bf16": cutegrad.bfloat16, "fp16": cutegrad.float16, "fp32": cutegrad.float32}[args.dtype]
    itemsize = 4 if args.dtype == "fp32" else 2
    rows = []
    for nbytes in [s for s in SIZES if s <= args.max_bytes]:
        t = cutegrad.ones(nbytes // itemsize, dtype=dtype, device=f"cuda:{backend.device_index}")
        row = {"bytes": nbytes}
        for name in ("one_shot", "two_shot", "nccl"):
            if name == "nccl":
                def call():
                    NcclBackend.all_reduce(backend, t, dist.ReduceOp.SUM, False)
            else:
                def call(algo=name):
                    backend.handover = {"one_shot_max_bytes": (1 << 62) if algo == "one_shot" else 0,
                                        "cute_max_bytes": None}
                    backend.all_reduce(t, dist.ReduceOp.SUM, False)
            for mode in ("eager", "graphed"):
                call()
                dist.barrier()
                us = _time(call, args.iters, mode == "graphed")
                row[f"{name}_{mode}_us"] = us
                row[f"{name}_{mode}_busbw_gbs"] = 2 * (world - 1) / world * nbytes / (us * 1e-6) / 1e9
        rows.append(row)
        del t
    dist.destroy_process_group()
    if g.rank == 0:
        _report(args, world, rows)


def handover_table(rows, mode="graphed"):
    """The crossovers measured: largest size where one-shot beats two-shot, and largest where ours beats NCCL."""
    one_shot_max, cute_max = 0, 0
    for r in rows:
        ours = min(r[f"one_shot_{mode}_us"], r[f"two_shot_{mode}_us"])
        if r[f"one_shot_{mode}_us"] <= r[f"two_shot_{mode}_us"]:
            one_shot_max = r["bytes"]
        if ours <= r[f"nccl_{mode}_us"]:
            cute_max = r["bytes"]
    return {"one_shot_max_bytes": one_shot_max,
            "cute_max_bytes": None if rows and cute_max == rows[-1]["bytes"] else cute_max}


def _report(args, world, rows):
    import torch
    from bench.results_file import gpu_result, write_result
    out_rows = []
    for r in rows:
        for mode in ("eager", "graphed"):
            ours = min(r[f"one_shot_{mode}_us"], r[f"two_shot_{mode}_us"])
            theirs = r[f"nccl_{mode}_us"]
            out_rows.append({"name": f"all_reduce {args.dtype} {r['bytes']} B x{world} {mode}", "unit": "us",
                             "cutegrad": round(ours, 2), "baseline": round(theirs, 2), "baseline_name": "NCCL",
                             "ratio": round(theirs / ours, 3)})
    table = handover_table(rows)
    result = gpu_result("allreduce", torch, out_rows, world_size=world, dtype=args.dtype, detail=rows,
                        recommended_handover=table)
    path = write_result(result, args.out, "allreduce")
    md = ["| bytes | one-shot us | two-shot us | NCCL us | best busbw GB/s | NCCL busbw GB/s | mode |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode in ("eager", "graphed"):
            best = max(r[f"one_shot_{mode}_busbw_gbs"], r[f"two_shot_{mode}_busbw_gbs"])
            md.append(f"| {r['bytes']} | {r[f'one_shot_{mode}_us']:.1f} | {r[f'two_shot_{mode}_us']:.1f} | "
                      f"{r[f'nccl_{mode}_us']:.1f} | {best:.0f} | {r[f'nccl_{mode}_busbw_gbs']:.0f} | {mode} |")
    md.append("")
    md.append(f"Recommended hand-over (graphed): `{json.dumps(table)}`")
    with open(path[:-len(".json")] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    _chart(rows, path[:-len(".json")] + ".png", world, args.dtype)


def _chart(rows, path, world, dtype):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (lat, bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [r["bytes"] for r in rows]
    for name in ("one_shot", "two_shot", "nccl"):
        for mode, style in (("eager", "--"), ("graphed", "-")):
            lat.plot(x, [r[f"{name}_{mode}_us"] for r in rows], style, marker="o", label=f"{name} {mode}")
            bw.plot(x, [r[f"{name}_{mode}_busbw_gbs"] for r in rows], style, marker="o", label=f"{name} {mode}")
    for ax, label in ((lat, "latency (us)"), (bw, "bus bandwidth (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message bytes")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    bw.legend(fontsize=7)
    fig.suptitle(f"all-reduce {dtype}, {world} GPUs: cutegrad CuTeDSL vs NCCL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = _args(argv)
    if "RANK" not in os.environ:
        return _relaunch(args)
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
