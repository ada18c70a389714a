"""The collectives of the default group, in torch.distributed's shape.

Each function checks its arguments on the calling rank (clear errors before
anything is sent), then hands them to the group's backend.  The cross-rank
check (same op, dtype and shapes on every rank) is the backend's, see process_group.py.
All collectives work in place on their output tensors; with async_op=True they
return a `Work` (wait(), is_completed()), otherwise None.
"""
from ..tensor import Tensor
from .process_group import ReduceOp, default_group

_REDUCIBLE = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64")


def _expect_tensor(what, name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{what}: {name} must be a cutegrad.Tensor, got {type(t).__name__}")


def _expect_device(what, group, tensors):
    cuda = group.backend.device_type == "cuda"
    for t in tensors:
        if t.is_cuda != cuda:
            raise ValueError(f"{what}: the {group.backend_name!r} backend takes {group.backend.device_type} tensors, "
                             f"got a tensor on {t.device}")
        if cuda and t.device.index != group.backend.device_index:
            raise ValueError(f"{what}: this rank's device is cuda:{group.backend.device_index}, got a tensor on "
                             f"{t.device}")


def _expect_op(what, op, dtype):
    if op not in ReduceOp.ALL:
        raise ValueError(f"{what}: unknown reduce op {op!r}; use ReduceOp.SUM, AVG, MAX or MIN")
    if dtype.name not in _REDUCIBLE:
        raise TypeError(f"{what}: cannot reduce {dtype.name} tensors")
    if op == ReduceOp.AVG and not dtype.is_floating_point:
        raise TypeError(f"{what}: ReduceOp.AVG needs a floating-point tensor, got {dtype.name}")


def _expect_same(what, name, tensors, like, shape=None):
    shape = like.shape if shape is None else shape
    for i, t in enumerate(tensors):
        _expect_tensor(what, f"{name}[{i}]", t)
        if t.dtype != like.dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{what}: {name}[{i}] is {t.dtype.name} {list(t.shape)}, expected {like.dtype.name} "
                             f"{list(shape)}")


def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
    """Reduce `tensor` over all ranks in place (SUM, AVG, MAX, MIN); half types accumulate in float32."""
    what = "all_reduce"
    _expect_tensor(what, "tensor", tensor)
    g = default_group(what)
    _expect_op(what, op, tensor.dtype)
    _expect_device(what, g, [tensor])
    return g.backend.all_reduce(tensor, op, async_op)


def broadcast(tensor, src=0, group=None, async_op=False):
    """Copy rank `src`'s `tensor` into every rank's `tensor`."""
    what = "broadcast"
    _expect_tensor(what, "tensor", tensor)
    g = default_group(what)
    if not isinstance(src, int) or not 0 <= src < g.world_size:
        raise ValueError(f"{what}: src {src!r} is not a rank of this group (world size {g.world_size})")
    _expect_device(what, g, [tensor])
    return g.backend.broadcast(tensor, src, async_op)


def all_gather(tensor_list, tensor, group=None, async_op=False):
    """tensor_list[r] <- rank r's `tensor`, on every rank."""
    what = "all_gather"
    _expect_tensor(what, "tensor", tensor)
    g = default_group(what)
    if not isinstance(tensor_list, (list, tuple)) or len(tensor_list) != g.world_size:
        raise ValueError(f"{what}: tensor_list must be a list of world_size ({g.world_size}) tensors, got "
                         f"{type(tensor_list).__name__} of {len(tensor_list) if hasattr(tensor_list, '__len__') else '?'}")
    _expect_same(what, "tensor_list", tensor_list, tensor)
    _expect_device(what, g, [tensor, *tensor_list])
    return g.backend.all_gather(list(tensor_list), tensor, async_op)


def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    """output_tensor (world_size * n elements, rank-major) <- every rank's input_tensor (n elements)."""
    what = "all_gather_into_tensor"
    _expect_tensor(what, "input_tensor", input_tensor)
    _expect_tensor(what, "output_tensor", output_tensor)
    g = default_group(what)
    _expect_flat_pair(what, output_tensor, input_tensor, g.world_size, "output_tensor")
    _expect_device(what, g, [output_tensor, input_tensor])
    return g.backend.all_gather_into_tensor(output_tensor, input_tensor, async_op)


def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False):
    """output <- the reduction over ranks of input_list[rank]."""
    what = "reduce_scatter"
    _expect_tensor(what, "output", output)
    g = default_group(what)
    if not isinstance(input_list, (list, tuple)) or len(input_list) != g.world_size:
        raise ValueError(f"{what}: input_list must be a list of world_size ({g.world_size}) tensors")
    _expect_same(what, "input_list", input_list, output)
    _expect_op(what, op, output.dtype)
    _expect_device(what, g, [output, *input_list])
    return g.backend.reduce_scatter(output, list(input_list), op, async_op)


def reduce_scatter_tensor(output, input, op=ReduceOp.SUM, group=None, async_op=False):
    """output (n elements) <- the reduction over ranks of chunk `rank` of input (world_size * n elements)."""
    what = "reduce_scatter_tensor"
    _expect_tensor(what, "output", output)
    _expect_tensor(what, "input", input)
    g = default_group(what)
    _expect_flat_pair(what, input, output, g.world_size, "input")
    _expect_op(what, op, output.dtype)
    _expect_device(what, g, [output, input])
    return g.backend.reduce_scatter_tensor(output, input, op, async_op)


def barrier(group=None, async_op=False, device_ids=None):
    """Return once every rank has reached the barrier."""
    g = default_group("barrier")
    return g.backend.barrier(async_op)


def _expect_flat_pair(what, big, small, world, big_name):
    if big.dtype != small.dtype:
        raise ValueError(f"{what}: dtypes differ: {big.dtype.name} vs {small.dtype.name}")
    if big.numel() != world * small.numel():
        raise ValueError(f"{what}: {big_name} must have world_size * {small.numel()} = {world * small.numel()} "
                         f"elements, got {big.numel()} (shape {list(big.shape)})")
    if not big.is_contiguous() or not small.is_contiguous():
        raise ValueError(f"{what}: both tensors must be contiguous")
