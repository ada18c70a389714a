"""50 training steps of each reference model on the GPU: cutegrad against PyTorch on the
same GPU, and cutegrad's graphed step against its eager step.

Models and batches are the reduced workloads of tests/test_parity_training.py (same
architecture code, small sizes), with the preset's optimizer, weight-decay groups,
gradient clipping and warmup + cosine schedule; PyTorch starts from cutegrad's initial
weights (bench/torch_models.py, through safetensors) and sees the same batches.

- fp32: losses within 1e-3 relative at every step, TF32 off on the PyTorch side
  (cutegrad at its default "highest" precision, so both do full float32 matmuls).
- bf16: `cutegrad.autocast("cuda", dtype=cutegrad.bfloat16)` against
  `torch.autocast("cuda", dtype=torch.bfloat16)`, float32 weights in both: within 2e-2.
- graphed: the step `cutegrad.train.make_step` builds, captured with
  `cutegrad.graphs.graphed` after one eager warm-up step and replayed for the other 49
  batches, against the same step run eagerly from the same weights. Both runs keep the
  learning rates in device tensors (what `cutegrad train --graphs` does, so the scheduler
  reaches the captured optimizer), so the two differ only in capture and replay: the
  same kernels on the same data, within 1e-5 relative (not asserted bit-equal: the
  replay runs the kernels on other addresses, and nothing here promises every
  reduction is order-independent of that).
- graphed with dropout on (p = 0.1 everywhere the models put dropout): each replay
  must draw the masks that the eager step at the same point of the Philox sequence
  draws (graphs/rng.py: the capture reads seed and base offset from device memory,
  refreshed before every replay), so the losses match eager's from the same seed, within
  1e-5; an eager run from another seed must differ, or dropout was not on.
"""
import contextlib
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors.torch")

import cutegrad  # noqa: E402
from test_parity_training import build_pair, reduced  # noqa: E402  (tests/ is on sys.path under pytest)
from bench.torch_models import torch_loss, torch_optimizer, torch_scheduler  # noqa: E402
from cutegrad import train as T  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cutegrad.cuda.is_available(), reason="needs a CUDA GPU for cutegrad"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs PyTorch with CUDA")]

WORKLOADS = ["reverse", "vit", "minigpt", "gpt2-small"]
STEPS = 50
RTOL = {"fp32": 1e-3, "bf16": 2e-2}
GRAPH_RTOL = 1e-5
DROPOUT = 0.1


@pytest.fixture
def no_tf32():
    """Full float32 matmuls and convolutions in PyTorch for the test, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def workload(name, dropout=0.0):
    """(reduced preset with `dropout`, the STEPS batches as a list: every run sees the same ones)."""
    preset, it = reduced(name, STEPS)
    preset = replace(preset, model=replace(preset.model, dropout=dropout))
    return preset, [next(it) for _ in range(STEPS)]


def cutegrad_losses(model, preset, batches, precision, graphed=False, device_lrs=False, seed=1234):
    """Per-step losses of `model` trained on `batches`, eagerly or as a captured step."""
    opt = T.build_optimizer(model, preset.optimizer)
    sched = T.build_scheduler(opt, preset)
    if device_lrs:
        T._device_lrs(opt, "cuda")
    amp = cutegrad.autocast("cuda", dtype=cutegrad.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    step = T.make_step(model, opt, preset.clip_grad_norm, amp)
    cutegrad.manual_seed(seed)  # dropout's Philox stream starts here in every run
    losses, replay = [], None
    for batch in batches:
        x, y = T._batch_to(batch, "cuda", cutegrad.float32)
        if not graphed:
            loss = step(x, y)
        elif replay is None:
            replay = cutegrad.graphs.graphed(step, (x, y), warmup=1)
            loss = replay.warmup_outputs
        else:
            loss = replay(x, y)
        sched.step()
        losses.append(float(loss.item()))
    if replay is not None:
        replay.reset()
    return np.array(losses)


def torch_losses(model, preset, batches, precision):
    opt = torch_optimizer(model, preset)
    sched = torch_scheduler(opt, preset)
    params = list(model.parameters())
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    losses = []
    for inputs, targets in batches:
        x = torch.from_numpy(np.ascontiguousarray(inputs)).cuda()
        y = torch.from_numpy(np.ascontiguousarray(targets)).cuda()
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = torch_loss(model, x, y)
        loss.backward()
        if preset.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, preset.clip_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return np.array(losses)


def fresh_model(preset):
    """The cutegrad model of build_pair (same seed, same weights), alone, on the GPU."""
    cutegrad.manual_seed(0)
    model = T.build_model(preset.model).to("cuda")
    model.train()
    return model


def assert_close_losses(ours, theirs, rtol, what):
    assert ours.shape == theirs.shape == (STEPS,)
    assert np.isfinite(ours).all() and np.isfinite(theirs).all(), f"{what}: non-finite loss\n{ours}\n{theirs}"
    rel = np.abs(ours - theirs) / np.abs(theirs)
    assert rel.max() <= rtol, (f"{what}: worst step {rel.argmax()} has relative difference {rel.max():.2e} "
                               f"> {rtol:g}\nours:   {ours}\ntheirs: {theirs}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", WORKLOADS)
def test_fifty_gpu_steps_match_pytorch(name, precision, no_tf32):
    torch.manual_seed(0)
    preset, batches = workload(name)
    cg_model, th_model = build_pair(preset, "cuda")
    ours = cutegrad_losses(cg_model, preset, batches, precision)
    theirs = torch_losses(th_model, preset, batches, precision)
    assert_close_losses(ours, theirs, RTOL[precision], f"{name} {precision}: cutegrad vs PyTorch")
    # The steps must have trained something, or agreement would prove little.
    assert ours[-5:].mean() < ours[:5].mean(), ours


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", WORKLOADS)
def test_graphed_step_matches_eager_step(name, precision):
    preset, batches = workload(name)
    eager = cutegrad_losses(fresh_model(preset), preset, batches, precision, device_lrs=True)
    replayed = cutegrad_losses(fresh_model(preset), preset, batches, precision, graphed=True, device_lrs=True)
    assert_close_losses(replayed, eager, GRAPH_RTOL, f"{name} {precision}: graphed vs eager")
    assert eager[-5:].mean() < eager[:5].mean(), eager


@pytest.mark.parametrize("name", WORKLOADS)
def test_graphed_step_draws_the_eager_dropout_masks(name):
    preset, batches = workload(name, dropout=DROPOUT)
    eager = cutegrad_losses(fresh_model(preset), preset, batches, "fp32", device_lrs=True, seed=1234)
    replayed = cutegrad_losses(fresh_model(preset), preset, batches, "fp32", graphed=True, device_lrs=True,
                               seed=1234)
    assert_close_losses(replayed, eager, GRAPH_RTOL, f"{name}: graphed vs eager with dropout {DROPOUT}")
    other_seed = cutegrad_losses(fresh_model(preset), preset, batches, "fp32", device_lrs=True, seed=99)
    # Another seed gives other masks and so other losses; without dropout the runs would be identical.
    rel = np.abs(other_seed - eager) / np.abs(eager)
    assert rel.max() > 1e-4, f"{name}: dropout {DROPOUT} seems inactive\n{eager}\n{other_seed}"
