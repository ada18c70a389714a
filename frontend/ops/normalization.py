"""batch_norm and normalize (torch.nn.functional's), composite over reductions and
pointwise ops: every backend, gradients from the ops, no host read (the running
statistics are updated in place on the device)."""
from ..autograd import grad_mode
from ..tensor import Tensor, numel_of
from . import pointwise as P
from . import reduction as R
from . import shape as S


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Normalize over every dim but the channel dim 1 of (N, C, ...): with the batch's statistics when
    training (then running_mean/var, when given, move by `momentum` toward the batch mean and unbiased
    variance, in place), with the running statistics otherwise."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    if len(input._shape) < 2:
        raise ValueError(f"batch_norm(): expected an input of at least 2 dims (N, C, ...), got {list(input._shape)}")
    if not input._dtype.is_floating_point:
        raise RuntimeError(f"batch_norm(): expected a floating point input, got {input._dtype}")
    c = input._shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and tuple(t._shape) != (c,):
            raise RuntimeError(f"batch_norm(): {name} of shape {list(t._shape)} does not match the {c} channels of "
                               f"input of shape {list(input._shape)}")
    dims = (0,) + tuple(range(2, len(input._shape)))
    bshape = (1, c) + (1,) * (len(input._shape) - 2)
    count = numel_of(input._shape) // c if c else 0
    if training:
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(input._shape)}")
        mean = R.mean(input, dims, keepdim=True)
        centered = P.sub(input, mean)
        var = R.mean(P.mul(centered, centered), dims, keepdim=True)
        if running_mean is not None and running_var is not None:
            with grad_mode.no_grad():
                m = S.reshape(mean.detach(), (c,)).to(running_mean._dtype)
                v = P.mul(S.reshape(var.detach(), (c,)), count / (count - 1)).to(running_var._dtype)
                running_mean.mul_(1 - momentum).add_(P.mul(m, momentum))
                running_var.mul_(1 - momentum).add_(P.mul(v, momentum))
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError("batch_norm(): running_mean and running_var must be given when training=False")
        mean = S.reshape(running_mean, bshape).to(input._dtype)
        var = S.reshape(running_var, bshape).to(input._dtype)
        centered = P.sub(input, mean)
    out = P.mul(centered, P.rsqrt(P.add(var, eps)))
    if weight is not None:
        out = P.mul(out, S.reshape(weight, bshape))
    if bias is not None:
        out = P.add(out, S.reshape(bias, bshape))
    return out


def normalize(input, p=2.0, dim=1, eps=1e-12):
    """input / max(||input||_p over dim, eps) (torch.nn.functional.normalize)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"normalize(): argument 'input' must be Tensor, not {type(input).__name__}")
    norm = R.norm(input, p, dim, keepdim=True)
    return P.div(input, P.clamp_min(norm, eps))
