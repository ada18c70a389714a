"""graphed(fn, sample_inputs): a whole training step captured once, replayed per batch.

`fn(*inputs)` is the step: forward, backward, optimizer step and gradient
zeroing, all on CUDA tensors, returning a tensor or a tuple of tensors (the
loss, say). `graphed`:

1. copies the sample inputs into *static* input tensors it owns;
2. warms up: runs `fn` on the static inputs `warmup` times on a side stream
   (which first waits for the current stream), so that lazily created state
   (optimizer moments, `.grad` buffers, allocator segments) exists before
   capture, then makes the current stream wait for the side stream. The
   warm-up steps are real steps: they update the parameters, as PyTorch's
   recipe does;
3. captures one call of `fn` into a CUDAGraph (private pool, or `pool`).

The outputs of the last warm-up call are kept as `GraphedStep.warmup_outputs`
(a training loop records the warm-up step's loss from there).

The returned `GraphedStep` is called with new inputs of the same shapes,
dtypes and devices: it copies them into the static inputs (on the current
stream), replays the graph and returns the static outputs, which the next call
overwrites. Other shapes or dtypes raise before anything is queued.
"""
from cutegrad.cuda.streams import Stream, current_stream

from .cuda_graph import CUDAGraph, graph


def _describe(t):
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


class GraphedStep:
    """A captured step: call it with inputs like the sample inputs."""

    def __init__(self, cuda_graph, static_inputs, static_outputs, warmup_outputs=None):
        self.graph = cuda_graph
        self.static_inputs = static_inputs
        self.static_outputs = static_outputs
        self.warmup_outputs = warmup_outputs

    def __call__(self, *inputs):
        static = self.static_inputs
        if len(inputs) != len(static):
            raise TypeError(f"graphed step was captured with {len(static)} input(s), got {len(inputs)}")
        for i, (x, s) in enumerate(zip(inputs, static)):
            if not hasattr(x, "shape") or not hasattr(x, "copy_"):
                raise TypeError(f"graphed step input {i} must be a Tensor, got {type(x).__name__}")
            if tuple(x.shape) != tuple(s.shape) or x.dtype is not s.dtype:
                raise ValueError(f"graphed step input {i} is {_describe(x)}, but the step was "
                                 f"captured with {_describe(s)}; capture another graph for new "
                                 "shapes or dtypes")
        for x, s in zip(inputs, static):
            if x is not s:
                s.copy_(x)
        self.graph.replay()
        return self.static_outputs

    def reset(self):
        """Release the graph and its memory pool."""
        self.graph.reset()


def _as_tuple(inputs):
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def graphed(fn, sample_inputs, *, warmup=3, pool=None):
    """Capture `fn(*sample_inputs)` as a replayable step; see the module docstring."""
    samples = _as_tuple(sample_inputs)
    for i, x in enumerate(samples):
        if getattr(getattr(x, "device", None), "type", None) != "cuda":
            raise ValueError(f"graphed: sample input {i} must be a CUDA tensor, got "
                             f"{_describe(x) if hasattr(x, 'shape') else type(x).__name__}")
        if getattr(x, "requires_grad", False):
            raise ValueError(f"graphed: sample input {i} requires grad; inputs are data copied "
                             "into static buffers (parameters belong inside the step)")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"graphed: warmup must be an int >= 1 (lazily created state must exist "
                         f"before capture), got {warmup!r}")
    devices = {x.device.index for x in samples}
    if len(devices) > 1:
        raise ValueError(f"graphed: sample inputs are on several devices {sorted(devices)}")
    import cutegrad
    dev = devices.pop() if devices else None
    static = tuple(cutegrad.empty_like(x) for x in samples)
    for s, x in zip(static, samples):
        s.copy_(x)
    cur = current_stream(dev)
    side = Stream(dev)
    side.wait_stream(cur)
    with side:
        for _ in range(warmup):
            warm = fn(*static)
    cur.wait_stream(side)
    g = CUDAGraph()
    with graph(g, pool=pool, stream=side):
        outputs = fn(*static)
    return GraphedStep(g, static, outputs, warm)
