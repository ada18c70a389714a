"""The dry-run launch count (bench/launches.py, on the recording stand-in for `_C`)
against the kernels a real training step launches on the GPU (`-m gpu`), counted
by CUPTI through torch.profiler: same preset, same step (bf16 autocast, backward,
clipping, fused optimizer), one warm-up step first in both.  The committed budget
(bench/launch_budget.json) is only worth something if the stand-in counts what
the GPU runs: a kernel the dry run cannot see (a split-K reduction it models
wrongly, a copy hidden in a backend) fails here with the kernel names."""
import collections
import json
import os
import sys
import tempfile

import pytest

import cutegrad as cg

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # bench/ is a package at the repository root
    sys.path.insert(0, _ROOT)


def _skip_reason():
    try:
        import cutegrad.cuda as cuda
        if not cuda.is_available():
            return "needs a CUDA GPU and driver"
        import torch  # noqa: F401  (CUPTI through torch.profiler counts the kernels)
    except Exception as exc:
        return f"needs a CUDA GPU, cutegrad._C and torch: {type(exc).__name__}: {exc}"
    return None


_SKIP = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def _gpu_step_activities(preset):
    """Names of the device activities (kernels, memcpys, memsets) of one real step, after a warm-up step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.launches import _inputs
    from cutegrad.models import build_model
    from cutegrad.train import build_optimizer, make_step

    cg.manual_seed(0)
    model = build_model(preset.model).to("cuda")
    opt = build_optimizer(model, preset.optimizer)
    inputs, targets = _inputs(cg, preset)
    # the step bench.launches records: clipping always on (max norm 1.0 or the preset's)
    step = make_step(model, opt, preset.clip_grad_norm or 1.0, cg.autocast("cuda", dtype=cg.bfloat16))

    step(inputs, targets)
    cg.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(inputs, targets)
        cg.cuda.synchronize()
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:  # the chrome trace's categories, as bench/e2e.py reads them
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    names = collections.Counter()
    for e in events:
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            names[e.get("name", "?")] += 1
    return names


@pytest.mark.parametrize("workload", ["reverse", "vit", "minigpt", "gpt2-small"])
def test_dry_run_counts_the_kernels_the_gpu_runs(workload):
    from bench import launches
    from cutegrad.models import PRESETS

    preset = PRESETS[workload]
    phases = launches.measure(preset)
    dry_total = sum(sum(c.values()) for c in phases.values())
    real = _gpu_step_activities(preset)
    real_total = sum(real.values())
    assert real_total > 0, "torch.profiler saw no device activity: CUPTI did not record cutegrad's kernels"
    assert dry_total == real_total, (
        f"{workload}: the dry run counts {dry_total} launches per step, the GPU ran {real_total}.\n"
        f"dry run by entry: {dict(sum((c for c in phases.values()), collections.Counter()))}\n"
        f"GPU by kernel: {dict(real.most_common())}")
