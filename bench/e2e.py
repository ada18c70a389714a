"""End-to-end training step, cutegrad vs PyTorch on one GPU: the kernel-vs-system study.

    python -m bench.e2e [--workloads reverse,vit,minigpt,gpt2-small] [--modes all] [--steps 50]
                        [--warmup 5] [--budget-s 450] [--batch-size gpt2-small=4] [--out bench/results]
    python -m bench.e2e --render bench/results/e2e-<gpu>.json      (table and chart; CPU only)

One process, one GPU. For each reference workload (the GPU presets,
`cutegrad.models.PRESETS`: model, batch, optimizer, gradient clipping and
dropout as there; the learning rate is held at the preset's peak, no
schedule) and each mode below, the script builds the model from one seed
(PyTorch gets cutegrad's initial weights through safetensors, see
bench/torch_models.py), runs warm-up steps, then measures. A step is:
zero the gradients, forward under the mode's precision, float32
cross-entropy, backward, clip the global gradient norm where the preset
clips, optimizer step. Batches come from cutegrad's data pipeline (see
`workload_batches`), a few of them uploaded once and cycled, so data
loading is not in the step.

Modes (MODES):
- cutegrad-eager-fp32 / -bf16: `cutegrad.train.make_step`, the step that
  `cutegrad train` runs; bf16 is `cutegrad.autocast("cuda",
  dtype=cutegrad.bfloat16)` over float32 weights.
- cutegrad-graphed-fp32 / -bf16: the same step captured whole with
  `cutegrad.graphs.graphed(step, (x, y))` and replayed per batch.
- torch-eager-fp32 / -bf16: the same step in PyTorch (torch.autocast for
  bf16). AdamW is `fused=True`, PyTorch's fastest built-in AdamW (cutegrad's
  is a fused multi-tensor kernel too); SGD is PyTorch's default (foreach).
  TF32 is off for fp32 matmuls (the default of both: cutegrad runs TF32 only at "high").
- torch-compile-bf16: the forward and loss through `torch.compile` (default
  mode); backward, clipping and the fused optimizer step as in eager.
- cutegrad-compile-bf16: `cutegrad.compile(model)`, as a torch user writes
  `model = torch.compile(model)`, then the eager step: the model's forward and
  backward are captured per input signature and replayed (docs/graphs.md);
  clipping and the optimizer step run eagerly.
- torch-cudagraph-bf16: the whole step captured by hand as PyTorch's docs
  show: static inputs, three warm-up steps on a side stream, capture with
  `torch.cuda.graph`, AdamW `fused=True, capturable=True`, replay per batch.

Measurements per (workload, mode):
- ms/step: CUDA events recorded on the current stream between consecutive
  steps of an uninterrupted run of `--steps` steps (both libraries queue
  their work on the legacy default stream of the same primary context, so
  one set of events times either). In steady state an interval is the
  step's duration whichever side is the bottleneck: the device's run time
  when the host is ahead, the host's issue time when it is not. Median, p10,
  p90; `wall_ms_mean` is the host wall clock of the whole run / steps.
- kernels/step and kernel-ms/step: `torch.profiler` with
  ProfilerActivity.CUDA, i.e. CUPTI, which records every kernel executed in
  the process, cutegrad's driver-API launches and kernels inside replayed
  graphs included. The device is synchronized before and inside a
  `record_function` window around `--profile-steps` steps, so every kernel
  of those steps lies inside the window; kernel events (trace category
  "kernel") inside it are counted and their durations summed. memcpy and
  memset counts and times are reported apart. `launch_calls_per_step`
  counts the host's launch API calls (cudaLaunchKernel, cuLaunchKernel,
  cudaGraphLaunch, ...) where the profiler records them: a graphed step is
  one graph launch however many kernels it holds.
- host-ms/step: the device is synchronized (queue empty), then the step
  function is called and the time until it returns is taken, before
  synchronizing again. With an empty queue the host never waits for queue
  space, so this is the host's own cost of issuing one step (Python,
  dispatch, autograd, allocator, launch calls). A step queueing more than
  about a thousand launches can still fill the queue and wait; kernels/step
  shows where that can happen.
- allocator-ms/step (cutegrad): for `--alloc-steps` steps the process's
  cutegrad caching allocator (`cutegrad.allocator.get_allocator(device)`,
  whose `malloc`/`free` every CUDA tensor goes through) has both methods
  shadowed by wrappers that add the `perf_counter_ns` time of each call to
  accumulators; the allocator itself is unchanged. The figure includes the
  wrapper's clock reads (`clock_ns_per_call` is their measured cost).
  PyTorch's allocator is C++ and exposes no timing: reported as n/a, with
  its allocations per step from `torch.cuda.memory_stats()`.
- loss: the loss of the last timed step (a broken run shows there).

Each (workload, mode) runs in its own try/except: an error is recorded in the
JSON as a string and the run goes on. `--budget-s` bounds the whole run:
a mode that would start after it is recorded as skipped; within a workload the
modes run in RUN_ORDER, the telling comparisons (bf16 graphed and eager) first.
A mode whose steps are slow (from its warm-up) times fewer steps, down to 30
(`--mode-cap-s`), and fewer side steps (host, profiler, allocator), down to 1.

Output: bench/results/e2e-<gpu>.json (DESIGN.md's schema: device, driver,
versions, date, command, rows; the full per-mode data under "workloads"),
and from it e2e-<gpu>.md (tables) and e2e-<gpu>.png (chart, when matplotlib is
installed). `--render JSON` regenerates the last two from a JSON file alone.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

WORKLOADS = ("reverse", "vit", "minigpt", "gpt2-small")
# mode -> (framework, execution, precision)
MODES = {
    "cutegrad-eager-fp32": ("cutegrad", "eager", "fp32"),
    "cutegrad-eager-bf16": ("cutegrad", "eager", "bf16"),
    "cutegrad-graphed-fp32": ("cutegrad", "graphed", "fp32"),
    "cutegrad-graphed-bf16": ("cutegrad", "graphed", "bf16"),
    "torch-eager-fp32": ("torch", "eager", "fp32"),
    "torch-eager-bf16": ("torch", "eager", "bf16"),
    "torch-compile-bf16": ("torch", "compile", "bf16"),
    "cutegrad-compile-bf16": ("cutegrad", "compile", "bf16"),
    "torch-cudagraph-bf16": ("torch", "cudagraph", "bf16"),
}
# The order modes run in: the comparisons that matter most first, so a run that meets --budget-s
# loses the least telling ones (tables keep the MODES order).
RUN_ORDER = ("cutegrad-graphed-bf16", "torch-cudagraph-bf16", "cutegrad-eager-bf16", "torch-eager-bf16",
             "torch-compile-bf16", "cutegrad-compile-bf16", "cutegrad-eager-fp32", "torch-eager-fp32",
             "cutegrad-graphed-fp32")
# Pairs compared in the results' "rows" (cutegrad mode, PyTorch mode), besides best against best.
PAIRS = (("cutegrad-eager-fp32", "torch-eager-fp32"), ("cutegrad-eager-bf16", "torch-eager-bf16"),
         ("cutegrad-graphed-bf16", "torch-cudagraph-bf16"), ("cutegrad-compile-bf16", "torch-compile-bf16"))
N_BATCHES = 4  # distinct batches uploaded once per workload and cycled through
MIN_STEPS = 30
SEED = 0
LAUNCH_APIS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cudaGraphLaunch",
    "cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel", "cuGraphLaunch",
})
TOP_KERNELS = 10  # rows of the per-step profile
WINDOW = "bench.e2e.window"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --- command line ----------------------------------------------------------------------------
def _names(text, known, what):
    if text == "all":
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; "
                                         f"choose from {', '.join(known)} (comma-separated) or 'all'")
    return list(dict.fromkeys(names))


def _batch_overrides(items):
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in WORKLOADS or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"--batch-size expects WORKLOAD=N with N >= 1 and WORKLOAD one of "
                                             f"{', '.join(WORKLOADS)}, got {item!r}")
        out[name] = int(value)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.splitlines()[0])
    p.add_argument("--render", metavar="JSON", help="only write the .md table and .png chart of a results file")
    p.add_argument("--workloads", default="all", help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    p.add_argument("--modes", default="all", help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=50, help="timed steps per mode (>= 30 for a published result)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (after any capture)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler")
    p.add_argument("--host-steps", type=int, default=10, help="steps timed one by one on an idle device")
    p.add_argument("--alloc-steps", type=int, default=5, help="steps with cutegrad's allocator instrumented")
    p.add_argument("--budget-s", type=float, default=450.0, help="no mode starts after this many seconds")
    p.add_argument("--mode-cap-s", type=float, default=20.0,
                   help="a mode whose --steps would take longer times fewer steps (never fewer than 30)")
    p.add_argument("--merge", action="store_true",
                   help="keep the workloads and modes of an existing e2e-<gpu>.json that this run does not measure")
    p.add_argument("--batch-size", action="append", default=[], metavar="WORKLOAD=N",
                   help="override a workload's batch size (recorded in the results)")
    p.add_argument("--out", default=RESULTS, help="folder for e2e-<gpu>.json/.md/.png")
    args = p.parse_args(argv)
    try:
        args.workloads = _names(args.workloads, WORKLOADS, "workload")
        args.modes = _names(args.modes, tuple(MODES), "mode")
        args.batch_size = _batch_overrides(args.batch_size)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    for name in ("steps", "profile_steps", "host_steps", "alloc_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if not args.mode_cap_s > 0:
        p.error(f"--mode-cap-s must be > 0, got {args.mode_cap_s}")
    return args


# --- statistics ------------------------------------------------------------------------------
def percentile(values, q):
    """Linear-interpolated q-th percentile (0..100) of a non-empty list."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summary(values, digits=4):
    return {"median": round(statistics.median(values), digits), "p10": round(percentile(values, 10), digits),
            "p90": round(percentile(values, 90), digits), "n": len(values)}


# --- profiler trace --------------------------------------------------------------------------
def kernel_stats(trace, steps):
    """Per-step kernel count and time from a chrome trace (dict) of torch.profiler.

    Only device events inside the WINDOW annotation count; when the trace has no
    such annotation every device event does.
    """
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and e.get("ph") == "X"]
    windows = [e for e in events if e.get("name") == WINDOW and e.get("cat") == "user_annotation"]
    if windows:
        lo = min(float(w["ts"]) for w in windows)
        hi = max(float(w["ts"]) + float(w.get("dur", 0)) for w in windows)
    else:
        lo, hi = -math.inf, math.inf

    def inside(e):
        return lo <= float(e["ts"]) <= hi

    def of(cat):
        return [e for e in events if e.get("cat") == cat and inside(e)]

    kernels, copies, fills = of("kernel"), of("gpu_memcpy"), of("gpu_memset")
    api = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and inside(e)]
    launches = [e for e in api if e.get("name") in LAUNCH_APIS]
    by_name = {}
    for e in kernels + copies + fills:
        count, us = by_name.get(e.get("name", "?"), (0, 0.0))
        by_name[e.get("name", "?")] = (count + 1, us + float(e.get("dur", 0)))
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
    return {
        "kernels_per_step": round(len(kernels) / steps, 2),
        "kernel_ms_per_step": round(sum(float(e.get("dur", 0)) for e in kernels) / 1e3 / steps, 4),
        "memcpy_per_step": round(len(copies) / steps, 2),
        "memcpy_ms_per_step": round(sum(float(e.get("dur", 0)) for e in copies) / 1e3 / steps, 4),
        "memset_per_step": round(len(fills) / steps, 2),
        "memset_ms_per_step": round(sum(float(e.get("dur", 0)) for e in fills) / 1e3 / steps, 4),
        # None when the profiler recorded no API calls at all (then nothing can be said).
        "launch_calls_per_step": round(len(launches) / steps, 2) if api else None,
        "profiled_steps": steps,
        "window_found": bool(windows),
        # the profile of the step: its most expensive device activities, [name, calls/step, ms/step]
        "top_kernels": [[name, round(n / steps, 2), round(us / 1e3 / steps, 4)] for name, (n, us) in top],
    }


# --- data ------------------------------------------------------------------------------------
def workload_batches(name, preset, n, seed=SEED):
    """(list of n (inputs, targets) numpy batches, description) from cutegrad's data pipeline.

    reverse: `ReversalTask` training sequences; vit: `SyntheticImages` (what `cutegrad train vit`
    uses without --data); minigpt and gpt2-small: the corpus `resolve_corpus` finds without
    downloading (tiny Shakespeare through $CUTEGRAD_DATA, else the embedded text), encoded with
    the 4096-token BPE of the minigpt preset. gpt2-small's model keeps its 50304-token vocabulary
    (the ids are all below 4096; the step's cost does not depend on which ids they are). If the
    pipeline fails, random batches of the right shapes and vocabulary are used and the
    description says so.
    """
    import numpy as np

    from cutegrad import data as D

    b, cfg = preset.batch_size, preset.model
    try:
        if name == "reverse":
            task = D.ReversalTask(vocab_size=cfg.vocab_size, seq_len=cfg.block_size)
            it = task.batches(b, "train", seed)
            return [next(it) for _ in range(n)], f"reversal task (cutegrad.data.ReversalTask), seq {cfg.block_size}"
        if name == "vit":
            images = D.SyntheticImages("train", size=b * n, seed=seed)
            return ([images.get_batch(np.arange(i * b, (i + 1) * b)) for i in range(n)],
                    f"procedural {cfg.image_size}x{cfg.image_size}x{cfg.in_channels} images "
                    "(cutegrad.data.SyntheticImages)")
        corpus = D.resolve_corpus(download=False, log=lambda m: None)
        try:
            tok = D.BPETokenizer.train_cached(corpus.text, 4096)
        except OSError:  # an unwritable cache folder: train without keeping the result
            tok = D.BPETokenizer.train(corpus.text, 4096)
        tokens = np.asarray(tok.encode(corpus.text), dtype=np.int64)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"BPE vocabulary {tok.vocab_size} exceeds the model's {cfg.vocab_size}")
        it = D.TextDataset(tokens, cfg.block_size).random_batches(b, seed)
        desc = (f"{corpus.description}; BPE vocab {tok.vocab_size} ({len(tokens):,} tokens); windows of "
                f"{cfg.block_size}; model vocab {cfg.vocab_size}")
        return [next(it) for _ in range(n)], desc
    except Exception as e:  # the benchmark times steps; any batches of the right shapes do
        rng = np.random.default_rng(seed)
        if name == "vit":
            shape = (b, cfg.in_channels, cfg.image_size, cfg.image_size)
            batches = [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, cfg.num_classes, b))
                       for _ in range(n)]
        else:
            shape = (b, cfg.block_size)
            batches = [(rng.integers(0, cfg.vocab_size, shape), rng.integers(0, cfg.vocab_size, shape))
                       for _ in range(n)]
        return batches, f"synthetic random batches (the data pipeline failed: {type(e).__name__}: {e})"


# --- sessions: one (workload, mode) set up and ready to step ----------------------------------
class Session:
    """A model, its optimizer and its step, set up for one mode.

    step(i) issues one training step on batch i % N_BATCHES and returns the loss tensor;
    loss_value(loss) reads it (synchronizing); close() releases what it holds.
    """

    def __init__(self, step, loss_value, close, first_loss=None, notes=""):
        self.step = step
        self.loss_value = loss_value
        self.close = close
        self.first_loss = first_loss
        self.notes = notes


def cutegrad_session(cpu_model, preset, batches, execution, precision, warmup_graph=3, device="cuda"):
    import cutegrad
    from cutegrad import train as T

    model = copy.deepcopy(cpu_model).to(device)
    model.train()
    if execution == "compile":
        model = cutegrad.compile(model)
    opt = T.build_optimizer(model, preset.optimizer)
    amp = cutegrad.autocast(device.split(":")[0], dtype=cutegrad.bfloat16) if precision == "bf16" \
        else contextlib.nullcontext()
    step_fn = T.make_step(model, opt, preset.clip_grad_norm, amp)
    data = [T._batch_to(b, device, cutegrad.float32) for b in batches]
    state = {"model": model, "opt": opt, "data": data, "graph": None}

    def loss_value(loss):
        return float(loss.item())

    first = loss_value(step_fn(*data[0]))
    if execution in ("eager", "compile"):
        def step(i):
            return step_fn(*data[i % N_BATCHES])
    else:
        from cutegrad.graphs import graphed
        g = state["graph"] = graphed(step_fn, data[0], warmup=warmup_graph)

        def step(i):
            return g(*data[i % N_BATCHES])

    def close():
        if state["graph"] is not None:
            state["graph"].reset()
        state.clear()

    notes = (f"cutegrad.train.make_step; {type(opt).__name__} (fused multi-tensor kernel where eligible)" +
             (f"; graphed(step, warmup={warmup_graph})" if execution == "graphed" else "") +
             ("; cutegrad.compile(model): forward and backward replayed as CUDA graphs" if execution == "compile"
              else ""))
    return Session(step, loss_value, close, first, notes)


def torch_session(torch, weights, preset, batches, execution, precision, device="cuda"):
    import numpy as np

    from bench.torch_models import torch_loss, torch_optimizer, torch_twin

    model = torch_twin(preset.model, weights, device)
    model.train()
    options = {}
    if preset.optimizer.name == "adamw":
        options["fused"] = True
        if execution == "cudagraph":
            options["capturable"] = True
    opt = torch_optimizer(model, preset, **options)
    params = [p for p in model.parameters()]
    clip = preset.clip_grad_norm

    def amp():
        if precision == "bf16":
            return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_loss(x, y):
        with amp():
            return torch_loss(model, x, y)

    if execution == "compile":
        # Each workload compiles as it would in a fresh process: forward_loss is one code object for
        # every workload, so without a reset dynamo would recompile the later ones with dynamic shapes
        # (automatic_dynamic_shapes), which is what failed for vit.
        torch._dynamo.reset()
    loss_fn = torch.compile(forward_loss) if execution == "compile" else forward_loss

    def step_fn(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss.detach()

    data = [tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in b) for b in batches]
    state = {"model": model, "opt": opt, "data": data}

    def loss_value(loss):
        return float(loss.float().item())

    first = loss_value(step_fn(*data[0]))  # for compile: compiles here
    if execution == "cudagraph":
        static = tuple(t.clone() for t in data[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step_fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        g = state["graph"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_loss = step_fn(*static)

        def step(i):
            for s, t in zip(static, data[i % N_BATCHES]):
                s.copy_(t, non_blocking=True)
            g.replay()
            return static_loss
    else:
        def step(i):
            return step_fn(*data[i % N_BATCHES])

    def close():
        state.clear()

    notes = {"eager": "", "compile": "torch.compile(forward + loss), default mode",
             "cudagraph": "torch.cuda.graph of the whole step, 3 side-stream warm-up steps"}[execution]
    opt_name = type(opt).__name__ + (f"({', '.join(f'{k}=True' for k in options)})" if options else "")
    return Session(step, loss_value, close, first, "; ".join(x for x in (opt_name, notes) if x))


# --- measurement -----------------------------------------------------------------------------
class AllocatorClock:
    """Shadows an allocator's malloc/free with timed wrappers while active (the class is untouched)."""

    def __init__(self, alloc):
        self.alloc = alloc
        self.ns = 0
        self.mallocs = 0
        self.frees = 0

    def __enter__(self):
        alloc, clock = self.alloc, time.perf_counter_ns
        malloc, free = alloc.malloc, alloc.free

        def timed_malloc(nbytes, stream=0):
            t0 = clock()
            try:
                return malloc(nbytes, stream)
            finally:
                self.ns += clock() - t0
                self.mallocs += 1

        def timed_free(block):
            t0 = clock()
            try:
                return free(block)
            finally:
                self.ns += clock() - t0
                self.frees += 1

        alloc.malloc, alloc.free = timed_malloc, timed_free
        return self

    def __exit__(self, *exc):
        del self.alloc.malloc, self.alloc.free
        return False


def clock_cost_ns(n=20000):
    """Median cost of the two perf_counter_ns reads a timed wrapper adds per call."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(5):
        t0 = clock()
        for _ in range(n):
            clock()
            clock()
        samples.append((clock() - t0) / n)
    return round(statistics.median(samples), 1)


def timed_steps(args, seconds_per_step):
    """--steps, or fewer where they would take longer than --mode-cap-s: never fewer than
    min(30, --steps), the least a median here is published from."""
    if seconds_per_step * args.steps <= args.mode_cap_s:
        return args.steps
    return max(min(MIN_STEPS, args.steps), int(args.mode_cap_s / seconds_per_step))


def side_steps(requested, args, seconds_per_step):
    """Steps for one of the side measurements (host time, profile, allocator): as requested, or
    as many as fit in a quarter of --mode-cap-s, at least 1."""
    return min(requested, max(1, int(args.mode_cap_s / 4 / max(seconds_per_step, 1e-9))))


def measure(torch, session, framework, args, sync):
    """All measurements of one ready session; see the module docstring."""
    i = 0
    sync()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        session.step(i)
        i += 1
    sync()
    per_step = (time.perf_counter() - t0) / max(args.warmup, 1)
    steps = timed_steps(args, per_step)
    host_steps, profile_steps, alloc_steps = (side_steps(n, args, per_step) for n in
                                              (args.host_steps, args.profile_steps, args.alloc_steps))

    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    t0 = time.perf_counter()
    loss = None
    for k in range(steps):
        loss = session.step(i)
        i += 1
        events[k + 1].record()
    events[-1].synchronize()
    wall = time.perf_counter() - t0
    sync()
    step_ms = [events[k].elapsed_time(events[k + 1]) for k in range(steps)]
    out = {"ms_per_step": summary(step_ms), "wall_ms_mean": round(wall * 1e3 / steps, 4),
           "loss": session.loss_value(loss)}

    host = []
    for _ in range(host_steps):
        sync()
        t = time.perf_counter_ns()
        session.step(i)
        host.append((time.perf_counter_ns() - t) / 1e6)
        i += 1
    sync()
    out["host_ms_per_step"] = summary(host)

    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        with record_function(WINDOW):
            for _ in range(profile_steps):
                session.step(i)
                i += 1
            sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            out.update(kernel_stats(json.load(f), profile_steps))

    if framework == "cutegrad":
        from cutegrad.allocator import get_allocator
        with AllocatorClock(get_allocator(torch.cuda.current_device())) as clock:
            for _ in range(alloc_steps):
                session.step(i)
                i += 1
            sync()
        out["allocator_steps"] = alloc_steps
        out["allocator_ms_per_step"] = round(clock.ns / 1e6 / alloc_steps, 4)
        out["allocs_per_step"] = round(clock.mallocs / alloc_steps, 2)
        out["frees_per_step"] = round(clock.frees / alloc_steps, 2)
        out["allocator_note"] = "perf_counter_ns around cutegrad's CachingAllocator.malloc/free"
    else:
        before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
        for _ in range(alloc_steps):
            session.step(i)
            i += 1
        sync()
        after = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
        out["allocator_ms_per_step"] = None
        out["allocs_per_step"] = round((after - before) / alloc_steps, 2)
        out["allocator_note"] = ("n/a: PyTorch's CUDA caching allocator is C++ and exposes no timing; "
                                 "allocs_per_step from torch.cuda.memory_stats()")
    out["steps_run"] = i
    return out


def run_mode(torch, mode, preset, cpu_model, weights, batches, args):
    framework, execution, precision = MODES[mode]
    t0 = time.perf_counter()
    if framework == "cutegrad":
        import cutegrad
        cutegrad.manual_seed(SEED)

        def sync():
            cutegrad.cuda.synchronize()
            torch.cuda.synchronize()
        session = cutegrad_session(cpu_model, preset, batches, execution, precision)
    else:
        torch.manual_seed(SEED)
        sync = torch.cuda.synchronize
        session = torch_session(torch, weights, preset, batches, execution, precision)
    try:
        setup_s = time.perf_counter() - t0
        out = measure(torch, session, framework, args, sync)
        out.update({"setup_s": round(setup_s, 2), "first_loss": session.first_loss, "notes": session.notes})
        return out
    finally:
        session.close()


def _release(torch):
    """Give cached device memory back to the driver between modes, so each mode has the GPU to itself."""
    gc.collect()
    try:
        import cutegrad
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        cutegrad.cuda.synchronize()
        cutegrad.cuda.empty_cache()
    except Exception:  # a context broken by a failed mode: the next mode records its own error
        pass


def preset_for(name, args):
    from dataclasses import replace

    from cutegrad.models import PRESETS
    p = PRESETS[name]
    if name in args.batch_size:
        p = replace(p, batch_size=args.batch_size[name])
    return p


def device_info(torch):
    from bench.results_file import cutegrad_version, driver_version
    return {
        "device": torch.cuda.get_device_name(0),
        "driver": driver_version(),
        "versions": {"cutegrad": cutegrad_version(), "python": platform.python_version(),
                     "torch": torch.__version__, "cuda": torch.version.cuda},
    }


def run(args, save=None):
    """Measure everything args ask for; `save(result)` is called after every mode, so a run cut
    short still leaves its results so far."""
    import torch

    import cutegrad
    from bench.torch_models import cutegrad_weights
    from cutegrad import train as T

    if not (torch.cuda.is_available() and cutegrad.cuda.is_available()):
        raise SystemExit("bench.e2e measures on a CUDA GPU: torch.cuda.is_available() is "
                         f"{torch.cuda.is_available()}, cutegrad.cuda.is_available() is {cutegrad.cuda.is_available()} "
                         "(--render JSON works without one)")
    torch.cuda.init()
    torch.empty(1, device="cuda")  # PyTorch creates the primary context; cutegrad shares it
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    result = {**device_info(torch),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m bench.e2e " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
              "settings": {"steps": args.steps, "warmup": args.warmup, "profile_steps": args.profile_steps,
                           "host_steps": args.host_steps, "alloc_steps": args.alloc_steps,
                           "budget_s": args.budget_s, "mode_cap_s": args.mode_cap_s,
                           "batch_overrides": args.batch_size,
                           "lr": "constant at the preset's peak", "tf32": False,
                           "allocator_clock_ns_per_call": clock_cost_ns()},
              "modes": {m: dict(zip(("framework", "execution", "precision"), MODES[m])) for m in args.modes},
              "workloads": {}}
    if args.steps < 30:
        result["settings"]["warning"] = f"only {args.steps} timed steps (< 30): a smoke run, not a result"
    for name in args.workloads:
        preset = preset_for(name, args)
        entry = result["workloads"][name] = {"batch_size": preset.batch_size, "model": preset.model.to_dict(),
                                             "optimizer": preset.optimizer.to_dict(),
                                             "clip_grad_norm": preset.clip_grad_norm, "modes": {}}
        if preset.batch_size != T.PRESETS[name].batch_size:
            entry["batch_note"] = f"batch {preset.batch_size} (preset: {T.PRESETS[name].batch_size}), --batch-size"
        try:
            batches, entry["data"] = workload_batches(name, preset, N_BATCHES)
            cutegrad.manual_seed(SEED)
            cpu_model = T.build_model(preset.model)
            weights = cutegrad_weights(cpu_model)
            entry["parameters"] = sum(p.numel() for p in cpu_model.parameters())
        except Exception as e:
            entry["error"] = f"setup: {type(e).__name__}: {e}"
            continue
        for mode in sorted(args.modes, key=RUN_ORDER.index):
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                entry["modes"][mode] = {"skipped": f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}"}
                continue
            print(f"[{elapsed:6.1f} s] {name} {mode} ...", file=sys.stderr, flush=True)
            try:
                r = run_mode(torch, mode, preset, cpu_model, weights, batches, args)
                print(f"          {r['ms_per_step']['median']:.3f} ms/step, {r['kernels_per_step']} kernels, "
                      f"host {r['host_ms_per_step']['median']:.3f} ms, loss {r['loss']:.4f}", file=sys.stderr)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}",
                     "traceback": "".join(traceback.format_exception(e)[-6:])[-3000:]}
                print(f"          error: {r['error']}", file=sys.stderr)
            entry["modes"][mode] = r
            _release(torch)
            if save is not None:
                result["total_s"] = round(time.perf_counter() - t_start, 1)
                save(result)
        del cpu_model, weights, batches
        _release(torch)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    result["rows"] = comparison_rows(result)
    return result


# --- results ---------------------------------------------------------------------------------
def _ms(entry):
    ms = entry.get("ms_per_step") if isinstance(entry, dict) else None
    return ms["median"] if ms else None


def framework_of(mode):
    """'cutegrad' or 'torch': every mode name starts with its framework."""
    return mode.split("-", 1)[0]


def best(modes, framework):
    """(mode, median ms) of the fastest measured mode of a framework, or (None, None)."""
    cands = [(m, _ms(e)) for m, e in modes.items() if framework_of(m) == framework and _ms(e)]
    return min(cands, key=lambda c: c[1]) if cands else (None, None)


def comparison_rows(result):
    """DESIGN.md's rows: per workload, best against best and the PAIRS; ratio = torch ms / cutegrad ms."""
    rows = []
    for name, w in result["workloads"].items():
        modes = w.get("modes", {})
        pairs = [(best(modes, "cutegrad"), best(modes, "torch"), True)]
        pairs += [((a, _ms(modes.get(a))), (b, _ms(modes.get(b))), False) for a, b in PAIRS]
        for (cm, cms), (tm, tms), is_best in pairs:
            if not (cms and tms):
                continue
            label = f"{name}: best cutegrad ({cm}) vs best PyTorch" if is_best else f"{name}: {cm}"
            rows.append({"name": label, "unit": "ms/step", "cutegrad": cms, "baseline": tms, "baseline_name": tm,
                         "ratio": round(tms / cms, 4)})
    return rows


def result_path(out, device):
    """out/e2e-<gpu>.json, the GPU named as bench.allocator names it (nvidia-h200, ...)."""
    from bench.results_file import gpu_slug
    return os.path.join(out, f"e2e-{gpu_slug(device)}.json")


_COUNTS = ("kernels_per_step", "launch_calls_per_step", "allocs_per_step")


def _cell(entry, key="ms_per_step"):
    """A table cell: the figure (a summary's median), or why there is none."""
    if not isinstance(entry, dict):
        return "—"
    if "error" in entry:
        return "error"
    if "skipped" in entry:
        return "skipped"
    v = entry.get(key)
    if isinstance(v, dict):
        v = v.get("median")
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:.1f}" if key in _COUNTS or abs(v) >= 100 else f"{v:.3f}"
    return f"{v}*" if "from_run" in entry else str(v)


def render_markdown(result):
    modes = list(result.get("modes") or MODES)
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [f"# End-to-end training step: cutegrad vs PyTorch on {result['device']}", "",
             f"{result['date']}, driver {result['driver']}, {versions}. `{result['command']}`.", "",
             "ms per training step (forward, loss, backward, clipping, optimizer step), median of "
             f"{result['settings']['steps']} steps. Ratio: best PyTorch ms / best cutegrad ms "
             "(above 1: cutegrad is faster).", ""]
    if result["settings"].get("warning"):
        lines += [f"**{result['settings']['warning']}**", ""]
    lines.append("| workload | " + " | ".join(modes) + " | best cutegrad | best PyTorch | ratio |")
    lines.append("|---|" + "---:|" * len(modes) + "---|---|---:|")
    for name, w in result["workloads"].items():
        ms = w.get("modes", {})
        (cm, cms), (tm, tms) = best(ms, "cutegrad"), best(ms, "torch")
        ratio = f"{tms / cms:.3f}" if cms and tms else "—"
        lines.append(f"| {name} | " + " | ".join(_cell(ms.get(m)) for m in modes) +
                     f" | {cm or '—'} | {tm or '—'} | {ratio} |")
    lines += ["", "## Where the step time goes", "",
              "kernels/step and kernel-ms/step: CUPTI through torch.profiler; launch calls/step: the host's "
              "launch API calls (one per graph replay); host-ms/step: issuing one step on an idle device; "
              "allocator-ms/step: time inside cutegrad's allocator (n/a for PyTorch).", "",
              "| workload | mode | ms/step | kernel-ms/step | kernels/step | launch calls/step | host-ms/step | "
              "allocator-ms/step | allocs/step | loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    problems = []
    for name, w in result["workloads"].items():
        if "error" in w:
            problems.append(f"- {name}: {w['error']}")
        for m in modes:
            e = w.get("modes", {}).get(m)
            if not isinstance(e, dict):
                continue
            if "error" in e or "skipped" in e:
                problems.append(f"- {name} {m}: {e.get('error') or e.get('skipped')}")
                continue
            loss = e.get("loss")
            loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "—"
            lines.append(f"| {name} | {m} | {_cell(e)} | {_cell(e, 'kernel_ms_per_step')} | "
                         f"{_cell(e, 'kernels_per_step')} | {_cell(e, 'launch_calls_per_step')} | "
                         f"{_cell(e, 'host_ms_per_step')} | {_cell(e, 'allocator_ms_per_step')} | "
                         f"{_cell(e, 'allocs_per_step')} | {loss} |")
    lines += _profile_section(result)
    lines += ["", "## Workloads", ""]
    for name, w in result["workloads"].items():
        if "error" in w:
            lines.append(f"- {name}: not measured ({w['error']})")
            continue
        params = w.get("parameters")
        params = f"{params:,} parameters" if isinstance(params, int) else "parameters unknown"
        note = f"; {w['batch_note']}" if w.get("batch_note") else ""
        lines.append(f"- {name}: batch {w.get('batch_size')}, {params}; data: {w.get('data', '?')}{note}")
    if result.get("merged_runs"):
        runs = "; ".join(f"`{r.get('command')}` ({r.get('date')})" for r in result["merged_runs"])
        lines += ["", f"\\* measured by an earlier run merged into this file (`--merge`): {runs}."]
    if problems:
        lines += ["", "## Errors and skipped modes", ""] + problems
    return "\n".join(lines) + "\n"


def _short(name, width=90):
    return name if len(name) <= width else name[:width - 3] + "..."


def _profile_section(result):
    """The graphed bf16 step's top kernels next to PyTorch's fastest mode's, per workload."""
    lines = []
    for name, w in result["workloads"].items():
        ms = w.get("modes", {})
        ours = ms.get("cutegrad-graphed-bf16") or {}
        theirs_mode, _ = best(ms, "torch")
        theirs = ms.get(theirs_mode) or {}
        if not ours.get("top_kernels") or not theirs.get("top_kernels"):
            continue
        if not lines:
            lines += ["", "## Profile: top kernels of one step", "",
                      f"CUPTI through torch.profiler over {result['settings'].get('profile_steps')} steps; "
                      "cutegrad's graphed bf16 step against PyTorch's fastest mode; ms and calls per step.", ""]
        lines += [f"### {name}: cutegrad-graphed-bf16 ({ours.get('kernel_ms_per_step')} kernel-ms) vs "
                  f"{theirs_mode} ({theirs.get('kernel_ms_per_step')} kernel-ms)", "",
                  "| # | cutegrad kernel | calls | ms | PyTorch kernel | calls | ms |", "|---:|---|---:|---:|---|---:|---:|"]
        a, b = ours["top_kernels"], theirs["top_kernels"]
        for i in range(max(len(a), len(b))):
            left = f"`{_short(a[i][0])}` | {a[i][1]} | {a[i][2]:.3f}" if i < len(a) else " | |"
            right = f"`{_short(b[i][0])}` | {b[i][1]} | {b[i][2]:.3f}" if i < len(b) else " | |"
            lines.append(f"| {i + 1} | {left} | {right} |")
        lines.append("")
    return lines


def render_chart(result, path):
    """One panel per workload: a bar per mode, ms/step (pale) with the kernel time inside it (dark),
    so the gap between kernel speed and system speed shows; returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = list(result.get("modes") or MODES)
    names = list(result["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * max(len(names), 1), 5.0), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, name in zip(axes[0], names):
        ms = result["workloads"][name].get("modes", {})
        top = max([_ms(e) or 0 for e in ms.values()] + [1e-3])
        for j, m in enumerate(modes):
            e = ms.get(m) or {}
            step = _ms(e)
            if step:
                ax.bar(j, step, color=colors(j % 10), alpha=0.4)
                k = e.get("kernel_ms_per_step")
                if k:
                    ax.bar(j, min(k, step), color=colors(j % 10), width=0.5)
                ax.text(j, step, f"{step:.3g}", ha="center", va="bottom", fontsize=6)
            else:
                why = "error" if "error" in e else "skipped" if "skipped" in e else "not run"
                ax.text(j, 0.02 * top, why, ha="center", va="bottom", rotation=90, fontsize=7)
        ax.set_ylim(0, 1.12 * top)
        ax.set_xlim(-0.6, len(modes) - 0.4)
        ax.set_title(name)
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes, fontsize=7, rotation=60, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("ms / step (pale: step, dark: kernel time)")
    fig.suptitle(f"cutegrad vs PyTorch, one training step on {result['device']}")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.3, top=0.88, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(json_path):
    """Write the .md table (and the .png chart, with matplotlib) next to a results JSON; returns the paths."""
    with open(json_path) as f:
        result = json.load(f)
    base = json_path[:-5] if json_path.endswith(".json") else json_path
    md, png = base + ".md", base + ".png"
    with open(md, "w") as f:
        f.write(render_markdown(result))
    written = [md]
    if render_chart(result, png):
        written.append(png)
    else:
        print("matplotlib is not installed: no chart (render again where it is: python -m bench.e2e --render "
              f"{json_path})", file=sys.stderr)
    return written


def merge(result, previous):
    """result plus the workloads and modes of `previous` that result lacks (each marked with its run)."""
    merged = copy.deepcopy(result)
    origin = {"date": previous.get("date"), "command": previous.get("command")}
    for name, w in previous.get("workloads", {}).items():
        mine = merged["workloads"].setdefault(name, {k: v for k, v in w.items() if k != "modes"} | {"modes": {}})
        for mode, entry in w.get("modes", {}).items():
            if mode not in mine["modes"]:
                mine["modes"][mode] = {**entry, "from_run": entry.get("from_run", origin)}
    for mode, info in previous.get("modes", {}).items():
        merged.setdefault("modes", {}).setdefault(mode, info)
    order = list(MODES)
    merged["modes"] = dict(sorted(merged["modes"].items(),
                                  key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    merged["merged_runs"] = previous.get("merged_runs", []) + [origin]
    merged["rows"] = comparison_rows(merged)
    return merged


def write_results(result, out, merge_with=None):
    """Write the JSON (merged with `merge_with`, a previous result, if given); returns its path."""
    os.makedirs(out, exist_ok=True)
    path = result_path(out, result["device"])
    data = merge(result, merge_with) if merge_with is not None else {**result, "rows": comparison_rows(result)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def main(argv=None):
    args = parse_args(argv)
    args.argv = argv
    if args.render:
        for p in render(args.render):
            print(f"wrote {p}")
        return 0
    previous = {}

    def save(result):
        if args.merge and "loaded" not in previous:
            path = result_path(args.out, result["device"])
            previous["loaded"] = None
            if os.path.exists(path):
                with open(path) as f:
                    previous["loaded"] = json.load(f)
        return write_results(result, args.out, previous.get("loaded"))

    result = run(args, save)
    json_path = save(result)
    print(f"wrote {json_path}")
    for p in render(json_path):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
