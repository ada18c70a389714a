"""Resuming fused CUDA optimizers from a cutegrad.save checkpoint (device step counters, momentum buffers,
a device lr): the resumed run equals the uninterrupted one on the same GPU, and the same checkpoint moves to
the CPU with map_location="cpu" and continues on the composite path."""
import numpy as np
import pytest

import cutegrad as cg
from test_cuda_ops import _SKIP
from test_optim_resume import DATA, N, M, OPTIMIZERS, SCHEDULES, _train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def _build(seed, opt_name, device, fused, lr_tensor=False):
    cg.manual_seed(seed)
    model = cg.nn.Sequential(cg.nn.Linear(5, 8), cg.nn.ReLU(), cg.nn.Linear(8, 3)).to(device)
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    for g in opt.param_groups:
        g["fused"] = fused
        if lr_tensor:
            g["lr"] = cg.full((), float(g["lr"]), dtype=cg.float32, device=device)
    return model, opt, SCHEDULES["step"](opt)


def _train_on(device, model, opt, sched, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = cg.nn.functional.mse_loss(model(cg.tensor(x, device=device)), cg.tensor(y, device=device))
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd_nesterov_wd", "adamw_groups"])
def test_fused_cuda_resume_equals_uninterrupted(tmp_path, opt_name, lr_tensor):
    model, opt, sched = _build(0, opt_name, "cuda", True, lr_tensor)
    straight = _train_on("cuda", model, opt, sched, DATA)

    model, opt, sched = _build(0, opt_name, "cuda", True, lr_tensor)
    first = _train_on("cuda", model, opt, sched, DATA[:N])
    path = tmp_path / "gpu.safetensors"
    cg.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, path)
    ckpt = cg.load(path)  # map_location=None: the optimizer state comes back on the device it was saved from
    if opt_name.startswith("adamw"):
        assert all(s["step"].device.type == "cuda" for s in ckpt["optim"]["state"].values())

    model, opt, sched = _build(1, opt_name, "cuda", True, lr_tensor)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    sched.load_state_dict(ckpt["sched"])
    assert first + _train_on("cuda", model, opt, sched, DATA[N:]) == straight

    # the same checkpoint, on the CPU
    cpu = cg.load(path, map_location="cpu")
    model_c, opt_c, sched_c = _build(1, opt_name, "cpu", False)
    model_c.load_state_dict(cpu["model"])
    opt_c.load_state_dict(cpu["optim"])
    sched_c.load_state_dict(cpu["sched"])
    for g in opt_c.param_groups:
        g["fused"] = False
    resumed_cpu = _train(model_c, opt_c, sched_c, DATA[N:])
    np.testing.assert_allclose(resumed_cpu, straight[N:], rtol=1e-4, atol=1e-6)
    assert len(resumed_cpu) == M
