"""The "cute" backend: our CuTeDSL all-reduce inside one node; NCCL for everything else.

Setup (on top of the NCCL backend it extends): every rank must be on one host
with 2..8 ranks; a `SymmetricWorkspace` (symmetric.py) of
`FLAG_BYTES + 2 * CAPACITY_BYTES` per rank.

Which all-reduce runs (`route`):
- the CuTeDSL kernel (`_C.allreduce`, kernels/cute/allreduce.py) for SUM and
  AVG of bf16 / fp16 / fp32 tensors whose size is a multiple of 16 bytes
  (strided or misaligned ones through a dense aligned copy): one-shot up to
  HANDOVER["one_shot_max_bytes"], two-shot above, in pieces of at most
  CAPACITY_BYTES; AVG then scales by 1 / world_size;
- NCCL otherwise (MAX/MIN, other dtypes, odd sizes or addresses) and for
  every other collective.
HANDOVER is PROVISIONAL: a guess until the two-GPU run measures the crossover
points with `python -m bench.allreduce` and commits the table (issue 13).
CUTEGRAD_CUTE_ONE_SHOT_MAX and CUTEGRAD_CUTE_MAX (bytes) override it.

The kernel runs on the communication stream after it waits for the current
stream, exactly like an NCCL collective (nccl_backend.py), so the async work
handles, DDP's overlap and CUDA graph capture behave the same; the kernels
synchronise the ranks on the device through epoch flags, with no host step.
"""
import os

from .process_group import ReduceOp
from .nccl_backend import NcclBackend

# Mirrors of kernels/cute/allreduce.py (that folder is not installed with the
# package); tests/test_distributed_symmetric.py checks they agree.
MAX_RANKS = 8
GRID = 128
BARRIERS = 2
FLAG_WORDS = BARRIERS * GRID * MAX_RANKS + GRID
FLAG_BYTES = -(-4 * FLAG_WORDS // 4096) * 4096  # the flags region, rounded up to 4 KiB (data areas stay aligned)
CAPACITY_BYTES = 64 << 20  # per parity area: the largest piece one launch reduces

# PROVISIONAL (not measured): to be replaced by the two-GPU run's table.
HANDOVER = {"one_shot_max_bytes": 256 << 10, "cute_max_bytes": None}

_KERNEL_DTYPES = {"bfloat16": ("bf16", 2), "float16": ("fp16", 2), "float32": ("fp32", 4)}


def route(dtype_name, op, nbytes, world, handover=None):
    """'one_shot', 'two_shot' or 'nccl' for an all-reduce; pure, so it is tested without a GPU.

    It depends only on what the cross-rank check makes equal on every rank (dtype, op, size): a
    rank's address or strides must never send it down another path than its peers (they would
    wait forever); strided or misaligned tensors go through a dense, aligned copy instead."""
    handover = HANDOVER if handover is None else handover
    if dtype_name not in _KERNEL_DTYPES or op not in (ReduceOp.SUM, ReduceOp.AVG):
        return "nccl"
    if not 2 <= world <= MAX_RANKS or nbytes % 16 or nbytes == 0:
        return "nccl"
    limit = handover.get("cute_max_bytes")
    if limit is not None and nbytes > limit:
        return "nccl"
    return "one_shot" if nbytes <= handover["one_shot_max_bytes"] else "two_shot"


def _handover_from_env():
    table = dict(HANDOVER)
    if "CUTEGRAD_CUTE_ONE_SHOT_MAX" in os.environ:
        table["one_shot_max_bytes"] = int(os.environ["CUTEGRAD_CUTE_ONE_SHOT_MAX"])
    if "CUTEGRAD_CUTE_MAX" in os.environ:
        table["cute_max_bytes"] = int(os.environ["CUTEGRAD_CUTE_MAX"])
    return table


class CuteBackend(NcclBackend):
    def __init__(self, group, device_id=None):
        if len(set(group.hosts)) != 1:
            raise ValueError(f"init_process_group: the 'cute' backend works inside one node, got hosts "
                             f"{sorted(set(group.hosts))}; use 'nccl' across nodes")
        if not 2 <= group.world_size <= MAX_RANKS:
            raise ValueError(f"init_process_group: the 'cute' backend takes 2..{MAX_RANKS} ranks, got "
                             f"{group.world_size}")
        super().__init__(group, device_id)
        from .._gemm import native
        from .symmetric import SymmetricWorkspace
        self._C = native()
        self._C.load_kernels()
        self.handover = _handover_from_env()
        self.workspace = SymmetricWorkspace(group, self.device_index, FLAG_BYTES + 2 * CAPACITY_BYTES)
        self._flags = list(self.workspace.bases)
        self._data = [b + FLAG_BYTES for b in self.workspace.bases]
        self.last_kernel = None

    def all_reduce(self, tensor, op, async_op):
        name = tensor.dtype.name
        algo = route(name, op, tensor.numel() * tensor.dtype.itemsize, self.group.world_size, self.handover)
        if algo == "nccl":
            return super().all_reduce(tensor, op, async_op)
        kernel_dtype, itemsize = _KERNEL_DTYPES[name]
        cap = CAPACITY_BYTES // itemsize
        g = self.group

        def reduce(t):
            from .. import cuda
            from ..autograd import no_grad
            with cuda.stream(self.stream), no_grad():
                work = t if t.data_ptr() % 16 == 0 else t.clone()  # fresh allocator blocks are aligned
                base, n = work.data_ptr(), work.numel()
                for start in range(0, n, cap):
                    count = min(cap, n - start)
                    ptr = base + start * itemsize
                    self.last_kernel = self._C.allreduce(algo, kernel_dtype, ptr, ptr, self._flags, self._data,
                                                         g.rank, g.world_size, count, cap, self.stream.handle)
                if op == ReduceOp.AVG:
                    work.mul_(1.0 / g.world_size)
                if work is not t:
                    t.copy_(work)

        def enqueue(stream):
            self._dense(tensor, reduce)
        return self._launch("all_reduce", ("all_reduce", op, name, tuple(tensor.shape)), [tensor], enqueue,
                            async_op)

    def close(self):
        workspace = getattr(self, "workspace", None)
        if workspace is not None:
            self.stream.synchronize()
            workspace.close()
            self.workspace = None
        super().close()
