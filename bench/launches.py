"""Kernel launches of one training step of each reference workload, counted without
a GPU on the dry-run CUDA device (cutegrad.cuda.dry_run: the real frontend,
dispatch, CUDA backend and caching allocator; every `_C` call is recorded).

    python -m bench.launches [--out bench/results/launches.json] [--workloads minigpt,...]

The step is the training loop's (frontend/train.py make_step): zero_grad, the
forward and loss under bf16 autocast, backward, gradient clipping (max norm 1.0,
or the preset's), and the fused optimizer (AdamW, SGD for reverse).  One warm-up
step runs first (optimizer states, step counters), then one step is recorded.

Counting: a `_C` call is one launch, except the entries that launch several
kernels, counted from their arguments as kernels/cuda/ops_bindings.cpp launches
them (LAUNCHES_PER_CALL); driver copies and memsets queued on a stream count one
each.  A GEMM call counts one launch: when the C++ heuristic picks split-K, a
reduction launch follows that the dry run cannot see.

Per transformer block: the step's forward + backward launches with n_layer
(depth) minus those with one block fewer.  The CuTeDSL norms answer as they would
on an sm_90 GPU: a call whose row length and dtypes have a specialization
(kernels/cute/norms.py) reports that kernel, others fall back as on the GPU.
"""
import argparse
import collections
import importlib.util
import json
import math
import os
import sys
from dataclasses import replace

from bench.dry_norms import answer_as_sm90, norm_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("reverse", "vit", "minigpt", "gpt2-small")
MT_GROUP = 48  # tensors per multi-tensor launch (kMaxTensorsPerLaunch in kernels/cuda/ops_args.h)


def _groups(n):
    return max(1, math.ceil(n / MT_GROUP))


H200_SMS = 132


def _gemm_launches(a):
    """One GEMM call's kernels: the C++ split-K heuristic (kernels/cuda/module.cpp, `_C.gemm_split_plan`,
    a pure function) runs long-K GEMMs as K-slices plus a fixed-order reduction, and a wave-tail
    hybrid adds one unsplit GEMM.  Modelled here for tensor-core operands on an H200's SMs."""
    (batch, m, k), (_, _, n), split_k, path = a[1], a[4], a[19], a[17]
    if split_k == 1 or path == 2 or batch != 1 or k < 256:
        return 1
    if split_k > 1:
        return 2
    from cutegrad import _C
    dp_rows, dp_cols, splits = _C.gemm_split_plan(m, n, k, batch, H200_SMS, 8)
    return 1 if splits == 1 else 2 + (1 if dp_rows or dp_cols else 0)


# _C entry -> launches of one call, from its positional arguments
def _index_sort_launches():
    spec = importlib.util.spec_from_file_location(
        "cutegrad_reference_index_sort", os.path.join(ROOT, "kernels", "reference", "index_sort.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sort_launches


_sort_launches = _index_sort_launches()

LAUNCHES_PER_CALL = {
    # the embedding backward: the index sort (kernels/reference/index_sort.py), then the run sums
    "index_add_rows": lambda a: _sort_launches(a[4], a[5]) + 1,
    # a step-counter increment before each update launch when increment_step
    "adamw": lambda a: _groups(len(a[1])) * (2 if a[16] else 1),
    "sgd": lambda a: _groups(len(a[1])),
    "multi_tensor_scale": lambda a: _groups(len(a[0])),
    # per-chunk sums of squares per group, then one finishing block
    "grad_norm": lambda a: _groups(len(a[0])) + 1,
    # dx; dweight/dbias (+ a finishing kernel when a split workspace is given)
    "norm_backward": lambda a: 1 + (1 if (a[11] or a[13]) else 0) + (1 if a[17] else 0),
    # two-stage reductions take a workspace
    "reduce": lambda a: 2 if a[-2] else 1,
    "gemm": _gemm_launches,
    # preprocess (delta, dQ accumulator), the CuTeDSL main kernel, postprocess (dQ scaled and cast)
    "attention_backward": lambda a: 3,
    # a call without a specialization launches nothing (the caller falls back)
    "cute_norm": lambda a: 1 if norm_table().forward(*a) else 0,
    "cute_norm_backward": lambda a: 1 if norm_table().backward(*a) else 0,
}
NOT_KERNELS = {"load_kernels", "gemm_specializations", "cute_norm_specializations"}


def _kernel_name(name, args):
    if name == "elementwise":
        return f"elementwise:{('unary', 'binary', 'where', 'clamp', 'act', 'copy', 'arange')[args[0]]}"
    return name


def count(calls, work):
    """Counter of launches by kernel name for recorded `_C` calls and driver work."""
    out = collections.Counter()
    for name, args, _ in calls:
        if name in NOT_KERNELS:
            continue
        per = LAUNCHES_PER_CALL.get(name)
        launched = per(args) if per else 1
        if launched:
            out[_kernel_name(name, args)] += launched
    for name, _ in work:
        out[f"driver:{name}"] += 1
    return out


def _inputs(cg, preset):
    b = preset.batch_size
    if preset.model_kind == "vit":
        m = preset.model
        x = cg.randn(b, m.in_channels, m.image_size, m.image_size, device="cuda")
        return x, cg.randint(0, m.num_classes, (b,), device="cuda")
    m = preset.model
    shape = (b, m.block_size)
    return cg.randint(0, m.vocab_size, shape, device="cuda"), cg.randint(0, m.vocab_size, shape, device="cuda")


def measure(preset):
    """{"forward", "backward", "optimizer": Counter} of one recorded training step of preset."""
    import cutegrad as cg
    from cutegrad.models import build_model
    from cutegrad.train import build_optimizer, loss_fn

    clip = preset.clip_grad_norm or 1.0
    with cg.cuda.dry_run() as dry:
        answer_as_sm90(dry)
        model = build_model(preset.model).to("cuda")
        opt = build_optimizer(model, preset.optimizer)
        inputs, targets = _inputs(cg, preset)
        marks = {}

        def step():
            opt.zero_grad(set_to_none=True)
            marks["start"] = (len(dry.calls), len(dry.work))
            with cg.autocast("cuda", dtype=cg.bfloat16):
                loss = loss_fn(model, inputs, targets)
            marks["forward"] = (len(dry.calls), len(dry.work))
            loss.backward()
            marks["backward"] = (len(dry.calls), len(dry.work))
            opt.clip_grad_norm_(clip)  # as frontend/train.py's make_step
            opt.step()
            marks["optimizer"] = (len(dry.calls), len(dry.work))

        step()  # warm-up: optimizer states and step counters are created here
        dry.reset()
        step()
        phases, prev = {}, marks["start"]
        for phase in ("forward", "backward", "optimizer"):
            end = marks[phase]
            phases[phase] = count(dry.calls[prev[0]:end[0]], dry.work[prev[1]:end[1]])
            prev = end
        # zero_grad(set_to_none=True) launches nothing; anything before "start" is counted with the optimizer
        phases["optimizer"] += count(dry.calls[:marks["start"][0]], dry.work[:marks["start"][1]])
    if not phases["forward"]["gemm"]:
        # Every workload has linear layers: a `_C` entry cached outside the dry run's stand-in
        # (a module-level reference to the real or a previous run's gemm) would undercount.
        raise RuntimeError("bench.launches: the step recorded no gemm call; some `_C.gemm` reference escaped "
                           "the dry run")
    return phases


def _depth_field(model_config):
    return "depth" if hasattr(model_config, "depth") else "n_layer"


def workload_row(name, preset):
    phases = measure(preset)
    field = _depth_field(preset.model)
    depth = getattr(preset.model, field)
    fewer = measure(replace(preset, model=replace(preset.model, **{field: depth - 1})))
    per_block = sum(phases["forward"].values()) + sum(phases["backward"].values()) \
        - sum(fewer["forward"].values()) - sum(fewer["backward"].values())
    by_name = collections.Counter()
    for c in phases.values():
        by_name.update(c)
    return {
        "workload": name,
        "blocks": depth,
        "total": sum(by_name.values()),
        "forward": sum(phases["forward"].values()),
        "backward": sum(phases["backward"].values()),
        "optimizer": sum(phases["optimizer"].values()),
        "per_block_fwd_bwd": per_block,
        "by_kernel": dict(sorted(by_name.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_phase": {k: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for k, v in phases.items()},
    }


def run(workloads):
    from cutegrad.models import PRESETS
    return [workload_row(w, PRESETS[w]) for w in workloads]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "launches.json"))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    a = p.parse_args(argv)
    rows = run([w for w in a.workloads.split(",") if w])
    doc = {
        "command": "python -m bench.launches " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": "dry-run CUDA device (cutegrad.cuda.dry_run), norms answered as on sm_90",
        "step": "zero_grad, forward + cross-entropy under bf16 autocast, backward, clip_grad_norm_, fused optimizer",
        "note": ("kernels per call from bench/launches.py LAUNCHES_PER_CALL: a GEMM adds the K-slice, reduction "
                 "and wave-tail launches of the C++ split-K plan for 132 SMs (an H200); the attention backward "
                 "is three kernels"),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    for r in rows:
        print(f"{r['workload']:>10}: {r['total']:5d} launches per step (forward {r['forward']}, backward "
              f"{r['backward']}, optimizer {r['optimizer']}); {r['per_block_fwd_bwd']} per block fwd+bwd")


if __name__ == "__main__":
    main()
