"""GradScaler: PyTorch's dynamic loss scaling for float16 mixed precision.

The scale lives in a one-element float32 tensor on the loss's device and the
count of steps since the last backoff in a one-element int32 tensor beside it,
as in torch, so every decision is made on the device:

- `scale(loss)` multiplies by the scale tensor;
- `unscale_(opt)` multiplies the gradients by 1/scale and records, per device,
  a float32 flag `found_inf` (1.0 when any gradient holds an inf or NaN);
- `step(opt)` applies the update only where `found_inf` is 0;
- `update()` backs the scale off on overflow, grows it after `growth_interval`
  clean steps (`torch._amp_update_scale_`'s rule, written with `where`).

Skipping without a host sync. torch's fused optimizers read `found_inf` inside
their kernels; cutegrad's fused AdamW/SGD kernels take a gradient scale and a
device learning rate but no skip flag (kernels/cuda/optim.cu). So on CUDA
`step` runs the update unconditionally and then selects, per tensor,
`where(found_inf, value before the step, value after)` for every parameter
and every pre-existing optimizer state tensor (a *masked step*). This queues
only device work, so it runs inside a captured graph (`graphed`, `compile`) and
never stalls the host; it costs one snapshot copy of the parameters and
their state and two launches per tensor. A step that creates optimizer state
(the first one) cannot restore what did not exist before, so that step, which
is never captured (every capture is preceded by eager warm-up), reads the flag
on the host and drops the new state when it skips. On the CPU the flag is read
on the host, as torch does for optimizers without fused skip support.

On CUDA the gradients are unscaled with the multi-tensor scale kernel and
checked through the fused gradient-norm kernel: an inf or NaN anywhere makes
the sum of squares non-finite. (A finite gradient above ~1.8e19 after
unscaling also overflows that sum and counts as an overflow; torch would let it
through.)

A scaler for "cuda" built without a GPU warns and disables itself, as torch's
does; a disabled scaler passes everything through (`scale` returns its
argument, `step` just steps). Scaling by a power of two is exact, so using the
scaler with bfloat16 autocast changes nothing but the skipped overflow steps;
torch does the same, and scripts pass `enabled=(dtype == float16)`.
"""
import warnings
from enum import Enum

from .. import dtypes as dt
from .. import ops
from ..autograd import grad_mode
from ..device import device as _device
from ..tensor import Tensor


class OptState(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _fresh_optimizer_state():
    return {"stage": OptState.READY, "found_inf_per_device": {}}


class GradScaler:
    """Dynamic loss scaling (torch.amp.GradScaler): scale, unscale_, step, update."""

    _warn_stacklevel = 2  # the "CUDA is not available" warning points at the caller's line

    def __init__(self, device="cuda", init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not isinstance(device, str) or device not in ("cuda", "cpu"):
            raise ValueError(f"GradScaler: device must be 'cuda' or 'cpu', got {device!r}")
        self._device = device
        self._enabled = bool(enabled)
        if self._device == "cuda" and self._enabled:
            from .. import cuda
            if not cuda.is_available():
                warnings.warn("cutegrad.amp.GradScaler is enabled, but CUDA is not available.  Disabling.",
                              stacklevel=self._warn_stacklevel)
                self._enabled = False
        if self._enabled:
            if growth_factor <= 1.0:
                raise ValueError(f"GradScaler: growth_factor must be > 1.0, got {growth_factor}")
            if backoff_factor >= 1.0:
                raise ValueError(f"GradScaler: backoff_factor must be < 1.0, got {backoff_factor}")
            if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
                raise ValueError(f"GradScaler: growth_interval must be a positive int, got {growth_interval!r}")
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._init_growth_tracker = 0
        self._scale = None  # created on the first scale(), on the loss's device
        self._growth_tracker = None
        self._per_optimizer_states = {}

    # -- scale -----------------------------------------------------------------------------------

    def _lazy_init(self, dev):
        self._scale = ops.full((), self._init_scale, dtype=dt.float32, device=dev)
        self._growth_tracker = ops.full((), self._init_growth_tracker, dtype=dt.int32, device=dev)

    def _check_initialised(self, funcname):
        if self._scale is None:
            raise RuntimeError(f"GradScaler.{funcname}: no scale yet. This may indicate your script did not use "
                               "scaler.scale(loss or outputs) earlier in the iteration.")

    def scale(self, outputs):
        """outputs (a tensor or nested lists/tuples of tensors) multiplied by the scale factor."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            if self._scale is None:
                self._lazy_init(outputs.device)
            return outputs * self._scale_on(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if hasattr(outputs, "__iter__") and not isinstance(outputs, (str, bytes, dict)):
            return map(self.scale, outputs)
        raise ValueError(f"GradScaler.scale: outputs must be a Tensor or an iterable of Tensors, "
                         f"got {type(outputs).__name__}")

    def _scale_on(self, dev):
        return self._scale if self._scale.device == dev else self._scale.to(dev, non_blocking=True)

    # -- unscale ---------------------------------------------------------------------------------

    def _state_of(self, optimizer):
        return self._per_optimizer_states.setdefault(id(optimizer), _fresh_optimizer_state())

    def unscale_(self, optimizer):
        """Divide the optimizer's gradients by the scale in place and record inf/NaN per device."""
        if not self._enabled:
            return
        self._check_initialised("unscale_")
        state = self._state_of(optimizer)
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # 1/scale rounded from float64, as torch computes it
        inv_scale = ops.reciprocal(self._scale.to(dt.float64)).to(dt.float32)
        state["found_inf_per_device"] = self._unscale_grads(optimizer, inv_scale)
        state["stage"] = OptState.UNSCALED

    def _unscale_grads(self, optimizer, inv_scale):
        per_device = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.dtype is dt.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                per_device.setdefault(g.device, {}).setdefault(g.dtype, []).append(g)
        found = {}
        with grad_mode.no_grad():
            for dev, by_dtype in per_device.items():
                inv = inv_scale if inv_scale.device == dev else inv_scale.to(dev, non_blocking=True)
                flag = ops.zeros((), dtype=dt.float32, device=dev)
                for grads in by_dtype.values():
                    flag = ops.maximum(flag, _unscale_and_check(grads, inv))
                found[dev] = flag
        return found

    # -- step ------------------------------------------------------------------------------------

    def step(self, optimizer, *args, **kwargs):
        """unscale_ (unless done already), then optimizer.step() unless a gradient overflowed."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_initialised("step")
        state = self._state_of(optimizer)
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        flags = list(state["found_inf_per_device"].values())
        if not flags:
            raise RuntimeError("No inf checks were recorded for this optimizer.")
        state["stage"] = OptState.STEPPED
        found_inf = _combine(flags, flags[0].device)
        if found_inf.device.type == "cuda":
            return masked_step(optimizer, found_inf, *args, **kwargs)
        if float(found_inf) == 0.0:
            return optimizer.step(*args, **kwargs)
        return None

    # -- update ----------------------------------------------------------------------------------

    def update(self, new_scale=None):
        """Back off on overflow, grow after growth_interval clean steps; or set new_scale."""
        if not self._enabled:
            return
        self._check_initialised("update")
        if new_scale is not None:
            if isinstance(new_scale, Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError("GradScaler.update: new_scale must be a float or a one-element tensor "
                                     "that does not require grad")
                self._scale.copy_(new_scale.reshape(()))
            else:
                self._scale.fill_(float(new_scale))
        else:
            flags = [f for s in self._per_optimizer_states.values() for f in s["found_inf_per_device"].values()]
            if not flags:
                raise RuntimeError("No inf checks were recorded prior to update.")
            update_scale_(self._scale, self._growth_tracker, _combine(flags, self._scale.device),
                          self._growth_factor, self._backoff_factor, self._growth_interval)
        self._per_optimizer_states = {}

    # -- accessors and state ---------------------------------------------------------------------

    def get_scale(self):
        """The current scale as a Python float (reads the device)."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale)

    def get_growth_factor(self):
        return self._growth_factor

    def set_growth_factor(self, new_factor):
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self):
        return self._backoff_factor

    def set_backoff_factor(self, new_factor):
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self):
        return self._growth_interval

    def set_growth_interval(self, new_interval):
        self._growth_interval = int(new_interval)

    def _get_growth_tracker(self):
        if not self._enabled:
            return 0
        return self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker)

    def is_enabled(self):
        return self._enabled

    def state_dict(self):
        """scale, growth_factor, backoff_factor, growth_interval, _growth_tracker ({} when disabled)."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._get_growth_tracker()}

    def load_state_dict(self, state_dict):
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "instance of GradScaler.")
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)


def _combine(flags, dev):
    out = flags[0] if flags[0].device == dev else flags[0].to(dev)
    for f in flags[1:]:
        out = out + (f if f.device == dev else f.to(dev))
    return out


def _unscale_and_check(grads, inv_scale):
    """Multiply grads (one device, one dtype) by inv_scale in place; a float32 flag, 1.0 if any was inf/NaN."""
    g0 = grads[0]
    if g0.device.type == "cuda" and all(g.is_contiguous() for g in grads):
        from ..backends.cuda import grad_norm_clip, multi_tensor_scale
        multi_tensor_scale(grads, inv_scale.reshape((1,)))
        norm = grad_norm_clip(grads, 1.0)[0]  # inf/NaN anywhere makes the sum of squares non-finite
        return ops.logical_not(ops.isfinite(norm)).to(dt.float32)
    flag = None
    for g in grads:
        bad = ops.logical_not(ops.all(ops.isfinite(g))).to(dt.float32)
        flag = bad if flag is None else ops.maximum(flag, bad)
        g.mul_(inv_scale.to(g.dtype))
    return flag


def update_scale_(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval):
    """torch._amp_update_scale_ with tensor ops (no host sync): scale and growth_tracker updated in place."""
    with grad_mode.no_grad():
        found = ops.gt(found_inf, 0.0)
        successful = growth_tracker + 1
        grow = ops.ge(successful, growth_interval)
        grown = scale * growth_factor
        grown = ops.where(ops.isfinite(grown), grown, scale)
        new_scale = ops.where(found, scale * backoff_factor, ops.where(grow, grown, scale))
        zero = ops.zeros_like(successful)
        new_tracker = ops.where(found, zero, ops.where(grow, zero, successful))
        scale.copy_(new_scale)
        growth_tracker.copy_(new_tracker)


def _state_tensors(optimizer):
    """(param, key, tensor) for every tensor held in the optimizer's per-parameter state."""
    out = []
    for p, s in optimizer.state.items():
        for k, v in s.items():
            if isinstance(v, Tensor):
                out.append((p, k, v))
    return out


def masked_step(optimizer, found_inf, *args, **kwargs):
    """optimizer.step(), then every parameter and state tensor put back where found_inf is nonzero.

    Only device work when the step changes nothing but tensors that existed
    before it (so it can be captured). A step that creates state, or changes a
    host value in it (the int step count of the composite Adam path), reads
    found_inf on the host and, on overflow, puts the old state dicts back.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    before = {p: dict(s) for p, s in optimizer.state.items()}
    with grad_mode.no_grad():
        saved_params = [ops.clone(p) for p in params]
        saved_state = [(p, k, ops.clone(v)) for p, k, v in _state_tensors(optimizer)]
    retval = optimizer.step(*args, **kwargs)
    with grad_mode.no_grad():
        keep_old = ops.gt(found_inf, 0.0)
        for p, old in zip(params, saved_params):
            p.copy_(ops.where(_on(keep_old, p), old, p))
        for p, k, old in saved_state:
            cur = optimizer.state[p][k]
            cur.copy_(ops.where(_on(keep_old, cur), old, cur))
    if any(_host_state_changed(before.get(p, {}), optimizer.state.get(p, {})) for p in params):
        from ..cuda import _check_not_capturing
        _check_not_capturing("GradScaler.step() on an optimizer step that creates state or changes host values "
                             "in it (warm up before capturing; use a fused optimizer)")
        if float(found_inf) != 0.0:
            for p in params:
                if p in before:
                    optimizer.state[p] = before[p]
                else:
                    optimizer.state.pop(p, None)
            return None
    return retval


def _host_state_changed(old, new):
    """Whether a step added state keys or changed a non-tensor value (which where() cannot restore)."""
    if set(new) - set(old):
        return True
    return any(not isinstance(v, Tensor) and old[k] != v for k, v in new.items())


def _on(flag, t):
    return flag if flag.device == t.device else flag.to(t.device, non_blocking=True)


__all__ = ["GradScaler", "OptState", "masked_step", "update_scale_"]
