"""The "nccl" backend: NCCL through nccl4py (`pip install cutegrad[distributed]`), imported lazily.

Device: `device_id` when given, else LOCAL_RANK, else rank modulo the number of
GPUs; it becomes the current device.  Rank 0 makes the NCCL unique id and
publishes it through the store; every rank builds its communicator from it.

Strided tensors go through a dense copy on the communication stream (`_dense`),
so a rank's memory layout never changes which collective its peers must run.

Streams, as in torch's ProcessGroupNCCL: each collective is enqueued on the
group's communication stream after it waits for the caller's current stream;
the tensors are marked used by that stream (`record_stream`) so the caching
allocator does not hand their memory out before NCCL is done.  A synchronous
call then makes the current stream wait for the communication stream; an
async one returns a Work whose wait() does it.  Nothing waits on the host, so
collectives capture into CUDA graphs.

Cross-rank argument check: one store round trip per collective (the same
signature exchange as the CPU backend), skipped while a CUDA graph is being
captured, inside `skip_cross_rank_checks()` (DDP's buckets) and when
CUTEGRAD_DISTRIBUTED_CHECKS=0 (for benchmarks).  Without it a
mismatch would hang inside NCCL.
"""
import os

from .process_group import ReduceOp, Work, cross_rank_checks_wanted

_NCCL_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64")


def import_nccl():
    """nccl.core and the raw bindings, or an ImportError that says how to install them."""
    try:
        import nccl.core as core
        from nccl.bindings import nccl as raw
    except ImportError as exc:
        raise ImportError(f"the 'nccl' and 'cute' backends need nccl4py: pip install 'cutegrad[distributed]' "
                          f"(or pip install 'nccl4py[cu13]'); import failed: {exc}") from None
    return core, raw


def pick_device(group, device_id):
    from .. import cuda
    if not cuda.is_available():
        raise RuntimeError(f"init_process_group: the {group.backend_name!r} backend needs CUDA GPUs and none is "
                           f"available; use backend='cpu'")
    if device_id is not None:
        index = device_id.index if hasattr(device_id, "index") else int(device_id)
    elif "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
    else:
        index = group.rank % cuda.device_count()
    if not 0 <= index < cuda.device_count():
        raise ValueError(f"init_process_group: rank {group.rank} would use cuda:{index}, but only "
                         f"{cuda.device_count()} GPUs are visible")
    cuda.set_device(index)
    return index


def checks_enabled():
    if os.environ.get("CUTEGRAD_DISTRIBUTED_CHECKS", "1") == "0" or not cross_rank_checks_wanted():
        return False
    from .. import cuda
    return not cuda.is_current_stream_capturing()


class NcclBackend:
    device_type = "cuda"

    def __init__(self, group, device_id=None):
        from .. import cuda
        self.group = group
        self.device_index = pick_device(group, device_id)
        core, self._raw = import_nccl()
        if group.rank == 0:
            group.store.set("nccl/uid", bytes(core.get_unique_id()))
        uid = core.UniqueId.from_bytes(group.store.wait(["nccl/uid"], timeout=group.timeout)[0])
        self.comm = core.Communicator.init(group.world_size, group.rank, uid)
        self._ops = {ReduceOp.SUM: int(core.SUM), ReduceOp.AVG: int(core.AVG), ReduceOp.MAX: int(core.MAX),
                     ReduceOp.MIN: int(core.MIN)}
        self._dtypes = {name: int(getattr(core, name.upper())) for name in _NCCL_DTYPES}
        self.stream = cuda.Stream(self.device_index)

    def _dtype(self, what, dtype):
        code = self._dtypes.get(dtype.name)
        if code is None:
            raise TypeError(f"{what}: NCCL has no {dtype.name}; supported: {', '.join(_NCCL_DTYPES)}")
        return code

    def _dense(self, tensor, run):
        """run(t) on the communication stream with t = tensor, or, for a strided tensor, a dense copy
        written back afterwards: whether a rank takes this detour never changes what its peers run."""
        from .. import cuda
        from ..autograd import no_grad
        if tensor.is_contiguous():
            run(tensor)
            return
        with cuda.stream(self.stream), no_grad():
            tmp = tensor.contiguous()
            run(tmp)
            tensor.copy_(tmp)

    def _launch(self, what, signature, tensors, enqueue, async_op):
        from .. import cuda
        g = self.group
        if checks_enabled():
            seq = g.next_seq()
            g.check_signatures(what, g.exchange(f"{what} (collective #{seq})", seq, signature))
        current = cuda.current_stream(self.device_index)
        self.stream.wait_stream(current)
        enqueue(self.stream.handle)
        for t in tensors:
            cuda.record_stream(t, self.stream)
        event = self.stream.record_event()
        if async_op:
            return Work(event=event)
        current.wait_event(event)
        return None

    def all_reduce(self, tensor, op, async_op):
        dt = self._dtype("all_reduce", tensor.dtype)

        def enqueue(s):
            self._dense(tensor, lambda t: self._raw.all_reduce(t.data_ptr(), t.data_ptr(), t.numel(), dt,
                                                               self._ops[op], self.comm._comm, s))
        return self._launch("all_reduce", ("all_reduce", op, tensor.dtype.name, tuple(tensor.shape)), [tensor],
                            enqueue, async_op)

    def broadcast(self, tensor, src, async_op):
        dt = self._dtype("broadcast", tensor.dtype)

        def enqueue(s):
            self._dense(tensor, lambda t: self._raw.broadcast(t.data_ptr(), t.data_ptr(), t.numel(), dt, src,
                                                              self.comm._comm, s))
        return self._launch("broadcast", ("broadcast", src, tensor.dtype.name, tuple(tensor.shape)), [tensor],
                            enqueue, async_op)

    def all_gather_into_tensor(self, output, tensor, async_op):
        dt = self._dtype("all_gather_into_tensor", tensor.dtype)
        return self._launch("all_gather_into_tensor", ("all_gather_into_tensor", tensor.dtype.name,
                                                       tuple(tensor.shape)), [output, tensor],
                            lambda s: self._raw.all_gather(tensor.data_ptr(), output.data_ptr(), tensor.numel(), dt,
                                                           self.comm._comm, s), async_op)

    def reduce_scatter_tensor(self, output, input, op, async_op):
        dt = self._dtype("reduce_scatter_tensor", output.dtype)
        return self._launch("reduce_scatter_tensor", ("reduce_scatter_tensor", op, output.dtype.name,
                                                      output.numel()), [output, input],
                            lambda s: self._raw.reduce_scatter(input.data_ptr(), output.data_ptr(), output.numel(),
                                                               dt, self._ops[op], self.comm._comm, s), async_op)

    def all_gather(self, tensor_list, tensor, async_op):
        """Through one flat buffer, then copies into the list on the communication stream."""
        from .. import cuda, ops
        flat = ops.empty((self.group.world_size * tensor.numel(),), dtype=tensor.dtype, device=tensor.device)
        work = self.all_gather_into_tensor(flat, tensor.contiguous(), async_op=True)
        with cuda.stream(self.stream):
            self.stream.wait_event(work._event)
            for r, out in enumerate(tensor_list):
                out.copy_(flat[r * tensor.numel():(r + 1) * tensor.numel()].reshape(tensor.shape))
            cuda.record_stream(flat, self.stream)
        return self._finish(async_op)

    def reduce_scatter(self, output, input_list, op, async_op):
        from .. import ops
        flat = ops.cat([t.reshape(-1) for t in input_list])
        return self.reduce_scatter_tensor(output, flat, op, async_op)

    def _finish(self, async_op):
        from .. import cuda
        event = self.stream.record_event()
        if async_op:
            return Work(event=event)
        cuda.current_stream(self.device_index).wait_event(event)
        return None

    def barrier(self, async_op):
        """A one-element all-reduce; a synchronous barrier also waits for it on the host, as torch's does."""
        from .. import ops
        token = ops.zeros((1,), device=f"cuda:{self.device_index}")
        work = self.all_reduce(token, ReduceOp.SUM, async_op=True)
        if async_op:
            return work
        work._event.synchronize()
        return None

    def close(self):
        comm, self.comm = getattr(self, "comm", None), None
        if comm is None:
            return
        if self.group.broken is not None:
            comm.abort()  # a peer is gone: a clean destroy could block on it
        else:
            self.stream.synchronize()
            comm.destroy()
