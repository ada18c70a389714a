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

    python -m bench.overhead [--device cpu|cuda|cuda-dry] [--repeats N] [--batch N] [--out DIR]

prints a table and writes bench/results/overhead-cpu.json, overhead-<gpu>.json
or overhead-cuda-dry.json (DESIGN.md's results schema; `ratio` > 1 means
cutegrad has the lower overhead).

`--device cuda-dry` needs no GPU: cutegrad runs on the dry-run CUDA device
(cutegrad.cuda.dry_run: the real frontend, dispatch, CUDA backend and caching
allocator, with every kernel call recorded instead of launched), so its figure
is the host cost of issuing the op, from the Python call to the launch, with
autograd recording where the row says so. Both sides are timed in the calling
thread's CPU time (time.thread_time_ns), so time preempted by other processes
on a shared machine does not count. The baseline is PyTorch on the CPU
for the same op on one-element tensors in the same run: its dispatcher and
autograd, with negligible arithmetic, on one intra-op thread. The minigpt rows use the full minigpt
preset on the dry device against PyTorch's twin of the model with every
dimension 1 (same layers, heads and ops). `--compare-to FILE` adds each row's
figures from an earlier results file as `cutegrad_before`/`cutegrad_min_before`.
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


def _batch_us(fn, batch, sync, clock=time.perf_counter_ns):
    sync()
    t0 = clock()
    for _ in range(batch):
        fn()
    elapsed = clock() - t0
    sync()
    return elapsed / batch / 1e3


def paired_median_us(fns, repeats, batch, syncs=None, clock=time.perf_counter_ns):
    """(median, min) microseconds per call of each fn. Batches of the fns
    alternate, so load from other processes on a shared machine hits them
    alike; the minimum is the figure least disturbed by that load. syncs[i]
    waits for fns[i]'s device work, between batches."""
    syncs = syncs or [lambda: None] * len(fns)
    for fn, sync in zip(fns, syncs):  # warm-up: caches, lazy imports, allocator pools
        _batch_us(fn, batch, sync, clock)
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, sync, out in zip(fns, syncs, samples):
            out.append(_batch_us(fn, batch, sync, clock))
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
    rows = [
        ("add 32x32 fp32", lambda: a + b),
        ("matmul 64x64 fp32", lambda: m1 @ m2),
        ("layer_norm 32x64 fp32", lambda: F.layer_norm(x, (64,), w, bias)),
        ("add 32x32 fp32, recording autograd", lambda: ga + gb),
    ]
    if device == "cuda":  # what the GPU run adds: the tensor-core GEMM's host cost and a whole eager step's
        rows += _gpu_cases(mod, F, t, device)
    return rows


def _gpu_cases(mod, F, t, device):
    """bf16 GEMM, bf16 linear+bias with grad, and the minigpt preset's forward+backward under bf16 autocast."""
    from cutegrad.models.presets import PRESETS
    bf16 = mod.bfloat16
    ma, mb = t(64, 256).to(bf16), t(256, 256).to(bf16)
    x = t(64, 256).to(bf16)
    w, bias = t(256, 256).to(bf16).requires_grad_(), t(256).to(bf16).requires_grad_()
    preset = PRESETS["minigpt"]
    if mod.__name__ == "torch":
        from bench.torch_models import TorchGPT
        with mod.device(device):
            model = TorchGPT(preset.model)
        loss_of = _torch_loss
    else:
        from cutegrad.models import build_model
        from cutegrad.train import loss_fn as loss_of
        model = build_model(preset.model).to(device)
    shape = (preset.batch_size, preset.model.block_size)
    idx = mod.randint(0, preset.model.vocab_size, shape, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        with mod.autocast("cuda", dtype=bf16):
            loss = loss_of(model, idx, idx)
        loss.backward()

    return [
        ("matmul 64x256 @ 256x256 bf16", lambda: ma @ mb),
        ("linear+bias 64x256 -> 256 bf16, recording autograd", lambda: F.linear(x, w, bias)),
        ("minigpt step forward+backward (batch 64, seq 128, bf16 autocast)", step),
    ]


def _torch_loss(model, inputs, targets):
    from bench.torch_models import torch_loss
    return torch_loss(model, inputs, targets)


def dry_cases(cg):
    """(name, callable) per row of --device cuda-dry, on the dry-run device (inside cutegrad.cuda.dry_run)."""
    from cutegrad.models import build_model
    from cutegrad.models.presets import PRESETS
    from cutegrad.train import build_optimizer, loss_fn
    F = cg.nn.functional
    bf16 = cg.bfloat16

    def t(*shape, dtype=cg.float32, grad=False):
        x = cg.randn(*shape, device="cuda", dtype=dtype)
        return x.requires_grad_() if grad else x

    a, b, row = t(64, 256), t(64, 256), t(256)
    ma, mb = t(64, 256, dtype=bf16), t(256, 256, dtype=bf16)
    x, w, bias = t(64, 256, dtype=bf16), t(256, 256, dtype=bf16, grad=True), t(256, dtype=bf16, grad=True)
    xl, wl, bl = t(64, 256), t(256, grad=True), t(256, grad=True)
    logits, target = t(64, 4096, grad=True), cg.randint(0, 4096, (64,), device="cuda")
    q, k, v = (t(8, 8, 128, 32, dtype=bf16, grad=True) for _ in range(3))
    preset = PRESETS["minigpt"]
    model = build_model(preset.model).to("cuda")
    opt = build_optimizer(model, preset.optimizer)
    for p in model.parameters():
        p.grad = cg.zeros_like(p)
    idx = cg.randint(0, preset.model.vocab_size, (preset.batch_size, preset.model.block_size), device="cuda")
    tgt = cg.randint(0, preset.model.vocab_size, (preset.batch_size, preset.model.block_size), device="cuda")
    step_model = build_model(preset.model).to("cuda")

    def minigpt_step():
        step_model.zero_grad(set_to_none=True)
        with cg.autocast("cuda", dtype=bf16):
            loss = loss_fn(step_model, idx, tgt)
        loss.backward()

    return [
        ("add 64x256 fp32", lambda: a + b),
        ("broadcast add 64x256 + 256 fp32", lambda: a + row),
        ("matmul 64x256 @ 256x256 bf16", lambda: ma @ mb),
        ("linear+bias 64x256 -> 256 bf16, recording autograd", lambda: F.linear(x, w, bias)),
        ("layer_norm 64x256 fp32, recording autograd", lambda: F.layer_norm(xl, (256,), wl, bl)),
        ("softmax 64x256 fp32", lambda: F.softmax(a, -1)),
        ("cross_entropy 64x4096 fp32, recording autograd", lambda: F.cross_entropy(logits, target)),
        ("sdpa causal 8x8x128x32 bf16, recording autograd",
         lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        (f"AdamW step, minigpt parameters ({len(list(model.parameters()))} tensors)", opt.step),
        ("minigpt step forward+backward (batch 64, seq 128, bf16 autocast)", minigpt_step),
    ]


def torch_one_element_cases(torch):
    """PyTorch CPU on one-element tensors, one case per row of dry_cases, in the same order."""
    import torch.nn.functional as TF
    from bench.torch_models import TorchGPT
    from cutegrad.models import build_model
    from cutegrad.models.presets import PRESETS
    from dataclasses import replace
    bf16 = torch.bfloat16

    def t(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    a, b, row = t(1, 1), t(1, 1), t(1)
    ma, mb = t(1, 1, dtype=bf16), t(1, 1, dtype=bf16)
    x, w, bias = t(1, 1, dtype=bf16), t(1, 1, dtype=bf16, grad=True), t(1, dtype=bf16, grad=True)
    xl, wl, bl = t(1, 1), t(1, grad=True), t(1, grad=True)
    logits, target = t(1, 1, grad=True), torch.zeros(1, dtype=torch.long)
    q, k, v = (t(1, 1, 1, 1, dtype=bf16, grad=True) for _ in range(3))
    preset = PRESETS["minigpt"]
    n_params = len(list(build_model(preset.model).parameters()))
    params = [torch.zeros(1, requires_grad=True) for _ in range(n_params)]
    for p in params:
        p.grad = torch.zeros(1)
    opt = torch.optim.AdamW(params, lr=preset.optimizer.lr, betas=preset.optimizer.betas,
                            weight_decay=preset.optimizer.weight_decay)
    c = preset.model
    tiny = replace(c, vocab_size=1, block_size=1, n_embd=c.n_head, n_head=c.n_head)  # head dim 1
    model = TorchGPT(tiny)
    idx = torch.zeros(1, 1, dtype=torch.long)

    def minigpt_step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=bf16):
            logits_ = model(idx).float()
        TF.cross_entropy(logits_.reshape(-1, 1), idx.reshape(-1)).backward()

    return [
        lambda: a + b,
        lambda: a + row,
        lambda: ma @ mb,
        lambda: TF.linear(x, w, bias),
        lambda: TF.layer_norm(xl, (1,), wl, bl),
        lambda: TF.softmax(a, -1),
        lambda: TF.cross_entropy(logits, target),
        lambda: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
        opt.step,
        minigpt_step,
    ]


def run_dry(args, cutegrad, torch):
    """--device cuda-dry: rows of dry_cases against torch_one_element_cases (see the module docstring)."""
    if torch is None:
        raise SystemExit("bench.overhead --device cuda-dry compares with PyTorch on the CPU: torch is not installed")
    torch.manual_seed(0)
    # One-element ops need no intra-op threads, and a second thread's spin-waits would count in
    # the calling thread's CPU time on a loaded machine: PyTorch runs single-threaded here.
    torch.set_num_threads(1)
    before = {}
    if args.compare_to:
        with open(args.compare_to) as f:
            before = {r["name"]: r for r in json.load(f)["rows"]}
    rows = []
    print(f"{'op':<70} {'cutegrad us':>12} {'torch us':>10} {'ratio':>7} {'launches':>8}   (min over batches)")
    from bench.dry_norms import answer_as_sm90
    with cutegrad.cuda.dry_run() as dry:
        answer_as_sm90(dry)  # the CuTeDSL norms an sm_90 build has, not a None that adds the fallback
        cutegrad.manual_seed(0)
        ours = dry_cases(cutegrad)
        theirs = torch_one_element_cases(torch)
        for (name, fn), tfn in zip(ours, theirs):
            # the minigpt step is ~1000 ops: fewer calls per batch keep the two sides' batches short
            batch = _batch_for(name, args)
            fn()
            dry.reset()
            fn()
            launches = sum(dry.launches().values())
            syncs = [dry.reset, lambda: None]
            # CPU time of this thread: on a shared machine, time spent preempted is not the op's cost
            (us, us_min), (base, base_min) = paired_median_us([fn, tfn], args.repeats, batch, syncs,
                                                              time.thread_time_ns)
            allocs = _fast_path_share(dry.allocator(), fn)  # after the timed calls: the steady state
            row = {"name": name, "unit": "us/op (host, median)", "cutegrad": round(us, 2), "baseline": round(base, 2),
                   "baseline_name": "PyTorch CPU eager, one-element tensors", "ratio": round(base / us, 4),
                   "cutegrad_min": round(us_min, 2), "baseline_min": round(base_min, 2), "launches": launches,
                   "allocator_fast_path": allocs}
            old = before.get(name)
            if old is not None:
                row["cutegrad_before"], row["cutegrad_min_before"] = old["cutegrad"], old["cutegrad_min"]
            rows.append(row)
            print(f"{name:<70} {us:12.2f} {base:10.2f} {base / us:7.3f} {launches:8d}   (min {us_min:.2f} / "
                  f"{base_min:.2f})", flush=True)
    result = {
        "device": f"cutegrad dry-run CUDA device on {cpu_model()}",
        "driver": None,
        "versions": versions(torch, "cpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.overhead " + " ".join(sys.argv[1:]),
        "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()},
        "note": (f"host CPU time per op (the calling thread's, time.thread_time_ns): median and minimum over "
                 f"{args.repeats} batches of back-to-back calls "
                 f"({args.batch} per batch, {max(1, args.batch // 100)} for the AdamW and minigpt rows), "
                 "cutegrad's and PyTorch's batches alternating, on a shared, loaded machine; launches: kernel "
                 "calls and driver memsets/copies one call queues; allocator_fast_path: share of one call's "
                 "allocations served by the allocator's exact-size fast path, after the timed calls"),
        "rows": rows,
    }
    if args.compare_to:
        result["before"] = args.before_label or args.compare_to
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "overhead-cuda-dry.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


def _batch_for(name, args):
    """Calls per timed batch: a whole step or optimizer update is ~1000 ops, so its batches are 100x shorter."""
    return max(1, args.batch // 100) if name.startswith(("minigpt", "AdamW")) else args.batch


def _fast_path_share(alloc, fn):
    """Share of fn's allocations that the allocator served from its exact-size fast path (after a warm call)."""
    fn()
    slow = alloc._malloc_general
    misses = [0]

    def counting(*a):
        misses[0] += 1
        return slow(*a)
    before = alloc._n_alloc_total
    alloc._malloc_general = counting
    try:
        fn()
    finally:
        del alloc._malloc_general
    total = alloc._n_alloc_total - before
    return round(1 - misses[0] / total, 4) if total else None


def versions(torch, device):
    from bench.results_file import cutegrad_version
    cuda = torch.version.cuda if torch is not None and device == "cuda" else None
    return {"cutegrad": cutegrad_version(), "python": platform.python_version(),
            "torch": torch.__version__ if torch is not None else None, "cuda": cuda}


def main():
    parser = argparse.ArgumentParser(description="host microseconds per op, cutegrad vs PyTorch on one device")
    parser.add_argument("--device", choices=("cpu", "cuda", "cuda-dry"), default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--compare-to", default=None, help="earlier results file whose cutegrad figures to keep")
    parser.add_argument("--before-label", default=None, help="what --compare-to measured (e.g. a commit), stored as 'before'")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    import cutegrad
    try:
        import torch
        import torch.nn.functional as TF
    except ImportError:
        torch = TF = None
    if args.device == "cuda-dry":
        return run_dry(args, cutegrad, torch)

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
            (us, us_min), (base, base_min) = paired_median_us([fn, tfn], args.repeats, _batch_for(name, args), syncs)
        else:
            ((us, us_min),), base, base_min = paired_median_us([fn], args.repeats, _batch_for(name, args)), None, None
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
