"""Fused cross-entropy rows (kernels/cuda/cross_entropy.cu); CUDA only, the
frontend's cross_entropy is composite elsewhere.
"""
from ... import dtypes as dt
from ...cuda import index_errors as _index_errors
from ...device import CUDA
from ...dispatch import register
from .launch import _cast_new, _contig, _empty, _is_cuda, _lib, _on, _ptr, _stream


@register("cross_entropy_rows", CUDA)
def cross_entropy_rows(logits, target, ignore_index=-100, label_smoothing=0.0):
    """(loss per row, logsumexp per row), both float32, for logits (rows, classes) and int64 target (rows).

    loss = lse - (1 - ls) * x[target] - ls * mean(x), 0 where target == ignore_index
    (torch's cross_entropy with reduction='none'); one launch, logits read twice.
    """
    dev = logits._storage.device
    stream = _stream(dev.index)
    logits, target = _ce_inputs(logits, target, stream)
    rows, classes = logits._shape
    loss = _empty((rows,), dt.float32, dev, stream)
    lse = _empty((rows,), dt.float32, dev, stream)
    _lib().cross_entropy(_ptr(logits), logits._dtype.index, _ptr(target), rows, classes, int(ignore_index),
                         float(label_smoothing), _ptr(loss), _ptr(lse), stream,
                         _index_errors.record_pointer(dev.index))
    return loss, lse


@register("cross_entropy_rows_backward", CUDA)
def cross_entropy_rows_backward(logits, target, lse, grad_rows, ignore_index=-100, label_smoothing=0.0):
    """d(sum_i grad_rows[i] * loss[i]) / d logits, in the logits' dtype, from the forward's lse."""
    dev = logits._storage.device
    stream = _stream(dev.index)
    logits, target = _ce_inputs(logits, target, stream)
    rows, classes = logits._shape
    if lse._shape != (rows,) or lse._dtype is not dt.float32 or not _is_cuda(lse):
        raise ValueError(f"cross_entropy_rows_backward: lse must be float32 CUDA of shape ({rows},)")
    grad_rows = _contig(grad_rows if grad_rows._dtype is dt.float32 else _cast_new(grad_rows, dt.float32, stream),
                        stream)
    if grad_rows._shape != (rows,):
        raise ValueError(f"cross_entropy_rows_backward: grad_rows must have shape ({rows},), got {list(grad_rows._shape)}")
    out = _empty((rows, classes), logits._dtype, dev, stream)
    _lib().cross_entropy_backward(_ptr(logits), logits._dtype.index, _ptr(target), rows, classes, int(ignore_index),
                                  float(label_smoothing), _ptr(_contig(lse, stream)), _ptr(grad_rows), _ptr(out),
                                  stream)
    return out


def _ce_inputs(logits, target, stream):
    if len(logits._shape) != 2:
        raise ValueError(f"cross_entropy_rows: logits must be (rows, classes), got shape {list(logits._shape)}")
    if target._shape != logits._shape[:1]:
        raise ValueError(f"cross_entropy_rows: target shape {list(target._shape)} does not match "
                         f"{logits._shape[0]} rows")
    dev = logits._storage.device
    target = _on(dev, target, stream)
    if target._dtype is not dt.int64:
        target = _cast_new(target, dt.int64, stream)
    return _contig(logits, stream), _contig(target, stream)
