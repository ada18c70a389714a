"""cutegrad.distributed: process groups and collectives in torch.distributed's shape.

    import cutegrad.distributed as dist
    dist.init_process_group("cpu")          # or "nccl", "cute"; env:// rendezvous
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    dist.destroy_process_group()

Launch with `cutegrad launch --nproc-per-node N script.py` (torchrun's flags).
See docs/distributed.md.
"""
from .process_group import (DEFAULT_TIMEOUT, WORLD, DistributedError, ReduceOp, Work, destroy_process_group, get_backend,
                    get_rank, get_world_size, init_process_group, is_available, is_initialized)
from .collectives import (all_gather, all_gather_into_tensor, all_reduce, barrier, broadcast, reduce_scatter,
                          reduce_scatter_tensor)


class group:
    """torch.distributed.group: `group.WORLD` is the default group."""
    WORLD = WORLD


__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "ReduceOp", "Work", "all_gather", "all_gather_into_tensor",
           "all_reduce", "barrier", "broadcast", "destroy_process_group", "get_backend", "get_rank",
           "get_world_size", "group", "init_process_group", "is_available", "is_initialized", "reduce_scatter",
           "reduce_scatter_tensor"]
