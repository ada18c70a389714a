"""Optimizer base: parameter groups, per-parameter state, state_dict in
PyTorch's layout (parameters referred to by their index across groups).

A group's lr may be a one-element tensor (a float32 CUDA tensor for the fused
kernels to read on the device): schedules and load_state_dict then write it in
place, so a CUDA graph that captured the step keeps reading the same memory."""
import copy

from ..tensor import Tensor
from ..autograd import grad_mode
from ..nn.module import zero_grads
from .fused import check_fused_at_construction


class _Required:
    def __repr__(self):
        return "<required parameter>"


required = _Required()


class Optimizer:
    _grad_scale = None  # the clipping coefficient clip_grad_norm_ left for the next step (a device tensor)

    def __init__(self, params, defaults):
        self.defaults = defaults
        self.state = {}
        self.param_groups = []
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                            "but got a Tensor")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group):
        if not isinstance(group, dict):
            raise TypeError(f"param group must be a dict, got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
        existing = set(id(p) for g in self.param_groups for p in g["params"])
        if any(id(p) in existing for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        group = dict(group)
        group["params"] = params
        for k, v in self.defaults.items():
            if v is required and k not in group:
                raise ValueError(f"parameter group didn't specify a value of required optimization parameter {k}")
            group.setdefault(k, v)
        check_fused_at_construction(type(self).__name__, [group], self._fused_option_blocker)
        self.param_groups.append(group)

    def _fused_option_blocker(self, group):
        """Why the group's options rule out the fused kernels (None: they do not)."""
        return None

    def zero_grad(self, set_to_none=True):
        self._grad_scale = None
        zero_grads((p for g in self.param_groups for p in g["params"]), set_to_none)

    def clip_grad_norm_(self, max_norm, norm_type=2.0):
        """nn.utils.clip_grad_norm_ over this optimizer's parameters, with the scaling folded into
        the next step(): the fused kernels read the clipping coefficient as their gradient scale, so
        clipping costs the norm's two launches and no pass over the gradients.  Until that step the
        gradients are unscaled; returns the total norm (a tensor, no host sync).

        Where the fused path cannot take the gradients (CPU, mixed dtypes, other norms) this is
        clip_grad_norm_ itself."""
        from ..nn.utils.clip_grad import clip_grad_norm_, fused_norm_and_coefficient
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return clip_grad_norm_(params, max_norm, norm_type)
        with grad_mode.no_grad():
            found = fused_norm_and_coefficient([p.grad for p in params], max_norm, norm_type) \
                if all(self._takes_grad_scale(g) for g in self.param_groups) else None
        if found is None:
            return clip_grad_norm_(params, max_norm, norm_type)
        total, self._grad_scale = found
        return total

    def _takes_grad_scale(self, group):
        """Whether this group's next update can apply a device gradient scale (fused optimizers say so)."""
        return False

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with grad_mode.enable_grad():
                loss = closure()
        with grad_mode.no_grad():
            for group in self.param_groups:
                self._update_group(group)
        self._grad_scale = None
        return loss

    def _update_group(self, group):  # pragma: no cover - every optimizer overrides
        raise NotImplementedError

    def state_dict(self):
        index = {}
        groups = []
        for g in self.param_groups:
            # Tensor values (a tensor lr) are snapshots: a schedule fills the live one in place.
            packed = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in g.items() if k != "params"}
            ids = []
            for p in g["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            packed["params"] = ids
            groups.append(packed)
        state = {index[id(p)]: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
                 for p, s in ((p, self.state[p]) for g in self.param_groups for p in g["params"] if p in self.state)}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for saved, own in zip(groups, self.param_groups):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = {}
        for idx, s in state_dict["state"].items():
            p = params[int(idx)]
            self.state[p] = {k: (_state_tensor(k, v, p) if isinstance(v, Tensor) else copy.deepcopy(v))
                             for k, v in s.items()}
        for saved, own in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k == "params":
                    continue
                if isinstance(own.get(k), Tensor):
                    own[k].fill_(float(v))
                else:
                    own[k] = v.clone() if isinstance(v, Tensor) else v

    def __repr__(self):
        lines = [type(self).__name__ + " ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        return "\n".join(lines) + "\n)"


def _state_tensor(key, v, p):
    """A loaded state tensor on p's device; moments take p's dtype (as torch casts them), the step stays."""
    v = v.to(p.device)
    if key != "step" and v.is_floating_point() and p.is_floating_point() and v.dtype is not p.dtype:
        v = v.to(p.dtype)
    return v.clone()


def lr_value(lr):
    """The group's lr as a Python float for the composite path (a tensor lr is read on the host)."""
    return float(lr) if isinstance(lr, Tensor) else lr


def check_lr(lr):
    """A float >= 0, or a one-element tensor holding one (torch accepts a tensor lr too)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor of one element, got {lr.dtype} of shape "
                             f"{list(lr.shape)}")
        value = float(lr)
    else:
        value = lr
    if not 0.0 <= value:
        raise ValueError(f"Invalid learning rate: {value}")
