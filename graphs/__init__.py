"""cutegrad.graphs: CUDA graph capture and replay, and random numbers under capture.

`CUDAGraph` captures GPU work queued on a side stream and replays it with one
launch; `graph(g)` is the context-manager form. Allocations made during a
capture come from the graph's private memory pool (`graph_pool_handle()` to
share one between graphs); `graphed(step, sample_inputs)` captures a whole
training step and replays it per batch. Work that cannot be captured (host syncs,
`.item()`, `.cpu()`, `empty_cache`) raises `cutegrad.cuda.StreamCaptureError`
after discarding the capture. `Generator.philox_args` gives random kernels
state that advances on every replay. The rules are in docs/graphs.md.

Importing this package does not initialise CUDA.
"""
from cutegrad.cuda import is_current_stream_capturing
from cutegrad.cuda.errors import StreamCaptureError

from .cuda_graph import CUDAGraph, graph, graph_pool_handle
from .graphed import GraphedStep, graphed
from .rng import Generator, GraphRngState, PhiloxArgs, default_generator, manual_seed

__all__ = [
    "CUDAGraph", "Generator", "GraphRngState", "GraphedStep", "PhiloxArgs", "StreamCaptureError",
    "default_generator", "graph", "graph_pool_handle", "graphed", "is_current_stream_capturing",
    "manual_seed",
]
