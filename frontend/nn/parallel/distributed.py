"""DistributedDataParallel: one model replica per process, gradients averaged during the backward.

Design (torch's DDP, reduced to what cutegrad needs):
- At construction the parameters and buffers of rank 0 are broadcast, so
  every replica starts identical.
- Buckets: the parameters that require gradients, in reverse registration
  order (roughly the order the backward produces their gradients), are
  grouped into buckets of at most `bucket_cap_mb` MiB, one dtype and device
  per bucket.  Each bucket owns one flat gradient buffer.
- A gradient hook on every parameter (it runs as the gradient arrives, before
  it is accumulated into `.grad`) folds in any gradient accumulated under
  `no_sync()`, copies the sum into the parameter's slot of the bucket buffer
  and hands that slot back as the gradient, so `.grad` becomes a view of the
  bucket (torch's gradient_as_bucket_view).  When a bucket's last gradient
  arrives its buffer is all-reduced with ReduceOp.AVG, asynchronously: on the
  CPU backend by the group's worker thread, on CUDA on the group's
  communication stream, so the reduction overlaps the rest of the backward.
- When the last bucket has been launched the hook waits for all of them (on
  CUDA: the current stream waits for the communication stream; nothing waits
  on the host), so `.grad` is averaged when backward() returns and a graphed
  training step captures the whole thing.
- `no_sync()`: hooks do nothing and gradients accumulate locally; the next
  backward outside it reduces the accumulated sum.

Constraints: every parameter that requires a gradient must receive one in
each synchronised backward (no find_unused_parameters: a forward that follows
a backward which left a bucket incomplete raises, naming the parameters), and
one backward per forward.
"""
import contextlib

from ... import distributed as dist
from ...distributed.process_group import skip_cross_rank_checks
from ...autograd import no_grad
from ..module import Module

_MiB = 1 << 20


class _Bucket:
    def __init__(self, params, names):
        from ... import ops
        self.params = params
        self.names = names
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        # padded to 16 elements so the buffer's size is a multiple of 16 bytes, which the
        # "cute" backend's kernels need (the padding is reduced along, never read)
        self.flat = ops.zeros((-(-n // 16) * 16,), dtype=params[0].dtype, device=params[0].device)
        self.arrived = [False] * len(params)
        self.pending = len(params)
        self.work = None

    def reset(self):
        self.arrived = [False] * len(self.params)
        self.pending = len(self.params)

    def slot(self, i):
        p = self.params[i]
        off = self.offsets[i]
        return self.flat[off:off + p.numel()].view(p.shape)


class DistributedDataParallel(Module):
    def __init__(self, module, device_ids=None, output_device=None, broadcast_buffers=True, bucket_cap_mb=25,
                 find_unused_parameters=False, gradient_as_bucket_view=True):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel: module must be a cutegrad.nn.Module, got "
                            f"{type(module).__name__}")
        if find_unused_parameters:
            raise NotImplementedError("DistributedDataParallel: find_unused_parameters is not supported; every "
                                      "parameter that requires grad must get a gradient in each backward")
        if not bucket_cap_mb > 0:
            raise ValueError(f"DistributedDataParallel: bucket_cap_mb must be positive, got {bucket_cap_mb}")
        if not dist.is_initialized():
            raise RuntimeError("DistributedDataParallel: call cutegrad.distributed.init_process_group first")
        self.module = module
        self.bucket_cap_mb = bucket_cap_mb
        self._sync = True
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        with no_grad():
            for _, p in module.named_parameters():
                dist.broadcast(p.detach(), src=0)
            if broadcast_buffers:
                for _, b in module.named_buffers():
                    dist.broadcast(b, src=0)
        object.__setattr__(self, "_buckets", self._make_buckets(named[::-1], bucket_cap_mb * _MiB))
        object.__setattr__(self, "_launched", 0)
        self._hooks = []
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                self._hooks.append(p.register_hook(self._make_hook(bucket, i)))

    @staticmethod
    def _make_buckets(named, cap_bytes):
        buckets, params, names, size = [], [], [], 0
        for name, p in named:
            nbytes = p.numel() * p.dtype.itemsize
            if params and (size + nbytes > cap_bytes or p.dtype != params[0].dtype or p.device != params[0].device):
                buckets.append(_Bucket(params, names))
                params, names, size = [], [], 0
            params.append(p)
            names.append(name)
            size += nbytes
        if params:
            buckets.append(_Bucket(params, names))
        return buckets

    def _make_hook(self, bucket, i):
        p = bucket.params[i]

        def hook(grad):
            if not self._sync:
                return None
            if bucket.arrived[i]:
                raise RuntimeError(f"DistributedDataParallel: parameter {bucket.names[i]} got a second gradient in "
                                   f"one backward pass (one backward per forward is supported)")
            slot = bucket.slot(i)
            full = grad if p.grad is None else p.grad + grad
            slot.copy_(full)
            p.grad = None  # AccumulateGrad then stores the slot itself as .grad
            bucket.arrived[i] = True
            bucket.pending -= 1
            if bucket.pending == 0:
                # the buckets agree across ranks by construction (the broadcasts at construction
                # compared every parameter's shape): no store round trip per bucket on GPUs
                with skip_cross_rank_checks():
                    bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.AVG, async_op=True)
                object.__setattr__(self, "_launched", self._launched + 1)
                if self._launched == len(self._buckets):
                    for b in self._buckets:
                        b.work.wait()
                        b.work = None
            return slot
        return hook

    def _check_previous_backward(self):
        if self._launched == len(self._buckets) or not any(any(b.arrived) for b in self._buckets):
            return
        missing = [n for b in self._buckets for n, seen in zip(b.names, b.arrived) if not seen]
        raise RuntimeError(f"DistributedDataParallel: the previous backward gave no gradient to "
                           f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; every parameter that "
                           f"requires grad must take part in the loss (find_unused_parameters is not supported)")

    def forward(self, *args, **kwargs):
        if self._sync:
            self._check_previous_backward()
            for b in self._buckets:
                b.reset()
            object.__setattr__(self, "_launched", 0)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally inside; the first backward after it reduces the sum."""
        old = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = old

    @property
    def require_backward_grad_sync(self):
        """torch's switch (nanoGPT sets it per micro-step): False makes backward accumulate locally, as no_sync."""
        return self._sync

    @require_backward_grad_sync.setter
    def require_backward_grad_sync(self, value):
        self._sync = bool(value)

    @property
    def bucket_sizes(self):
        """Elements per bucket, in launch order (for tests and logs)."""
        return [b.flat.numel() for b in self._buckets]
