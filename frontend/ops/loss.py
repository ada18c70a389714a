"""Losses beyond cross-entropy's family (ops/nn.py): l1_loss, binary_cross_entropy and
binary_cross_entropy_with_logits, composite over pointwise ops (every backend, autograd
from the ops) with torch's formulas and argument checks."""
from ..tensor import Tensor
from ..autocast import gate as _AC, fp32 as _ac_fp32
from . import pointwise as P
from .nn import _reduce_loss


def _check_pair(input, target, opname, same_shape):
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{opname}(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if same_shape and tuple(target._shape) != tuple(input._shape):
        raise ValueError(f"{opname}(): Target size ({list(target._shape)}) must be the same as input size "
                         f"({list(input._shape)})")
    if input._storage.device is not target._storage.device:
        raise RuntimeError(f"{opname}(): input is on {input.device} but target is on {target.device}")


def l1_loss(input, target, reduction="mean"):
    """mean |input - target| (torch.nn.functional.l1_loss; shapes broadcast)."""
    if _AC.armed:
        input, target = _ac_fp32(input, target)
    _check_pair(input, target, "l1_loss", same_shape=False)
    return _reduce_loss(P.abs(P.sub(input, target)), reduction)


def binary_cross_entropy(input, target, weight=None, reduction="mean"):
    """-(t log x + (1 - t) log(1 - x)) on probabilities x, each log clamped at -100 as torch's."""
    _check_pair(input, target, "binary_cross_entropy", same_shape=True)
    log_x = P.clamp_min(P.log(input), -100.0)
    log_1mx = P.clamp_min(P.log(P.rsub(input, 1.0)), -100.0)
    loss = P.neg(P.add(P.mul(target, log_x), P.mul(P.rsub(target, 1.0), log_1mx)))
    if weight is not None:
        loss = P.mul(loss, weight)
    return _reduce_loss(loss, reduction)


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """Sigmoid + binary cross-entropy in one stable formula (torch's):
    (1 - t) x + (1 + (pos_weight - 1) t) (log(1 + exp(-|x|)) + max(-x, 0))."""
    if _AC.armed:
        input, target, weight, pos_weight = _ac_fp32(input, target, weight, pos_weight)
    _check_pair(input, target, "binary_cross_entropy_with_logits", same_shape=True)
    softplus_neg = P.add(P.log1p(P.exp(P.neg(P.abs(input)))), P.relu(P.neg(input)))  # log(1 + exp(-x))
    if pos_weight is not None:
        softplus_neg = P.mul(P.add(P.mul(target, P.sub(pos_weight, 1.0)), 1.0), softplus_neg)
    loss = P.add(P.mul(P.rsub(target, 1.0), input), softplus_neg)
    if weight is not None:
        loss = P.mul(loss, weight)
    return _reduce_loss(loss, reduction)
