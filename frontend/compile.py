"""cutegrad.compile: torch.compile's signature, CUDA graph capture as its meaning.

cutegrad has no tracer or code generator: its kernels are compiled ahead of
time. What an eager framework loses on a small training step is host time per
op, and a CUDA graph removes it. So `compile(model)` does what PyTorch's
`make_graphed_callables` and torch.compile's "reduce-overhead" mode do:

- Calls are grouped by **signature**: the structure of the arguments, each
  tensor's shape, dtype, device and requires_grad, every non-tensor argument's
  value, grad mode, the autocast state and (for a module) `training`.
- The first `warmup` calls of a signature run eagerly (lazily created state,
  allocator segments and kernel modules exist afterwards). The next call
  copies its inputs into static input tensors and captures the forward into
  a CUDA graph, then, when grad mode is on and an output requires grad, the
  backward of those outputs (`autograd.grad` into static gradient buffers,
  with respect to the inputs that require grad and every leaf the forward
  used: the parameters) into a second graph sharing the first one's memory
  pool. Each later call copies its inputs in, replays the forward and returns
  copies of the static outputs (so an output kept from an earlier step is not
  overwritten); its backward copies the incoming gradients in, replays the
  backward graph and hands the parameter gradients to autograd, which
  accumulates them into `.grad` as usual (hooks included).
- A new signature captures again, up to `cache_size_limit` signatures; later
  new signatures run eagerly, with one warning.
- Anything capture forbids (a host sync, `.item()`, printing a CUDA tensor,
  a data-dependent shape, which needs a sync) raises StreamCaptureError inside
  the capture; the callable then runs eagerly from then on, with one warning
  naming the operation (`fullgraph=True` raises it instead, as torch's does
  for a graph break).
- Inputs on the CPU (or on several devices) run eagerly: on a machine without
  a GPU the compiled model behaves exactly as the model.
- A forward replay while the previous replay of the same signature still
  awaits its backward (two forwards, then one backward) runs eagerly: a
  replay would overwrite the activations the pending backward reads.

A module is compiled **in place**, as torch's `nn.Module.compile()` does:
`compile(model)` installs the compiled forward on the instance and returns the
same object, so `state_dict()` keys and checkpoints are unchanged (torch's
`torch.compile(model)` returns a wrapper whose keys gain an `_orig_mod.`
prefix; `_orig_mod` here is the module itself). A function gets a wrapper.

What a replay does not repeat: Python side effects of the forward (counters,
prints, attribute writes) and host values read during capture (a Python float
computed from a tensor, a module attribute): they are frozen into the graph.
In-place writes the forward makes to its tensor arguments land in the static
copies, not in the caller's tensors.
Parameters are read at their addresses: optimizer updates and
`load_state_dict` (in place) are seen by replays; moving or casting the
model (new storage) or replacing a parameter or buffer makes the next calls
warm up and capture again.
"""
import functools
import warnings
import weakref

from .autocast import state as _autocast_state
from .autograd import grad_mode
from .autograd.engine import AccumulateGrad
from .autograd.engine import grad as _autograd_grad
from .autograd.function import Function
from .tensor import Tensor

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_EAGER_BACKENDS = ("eager", "aot_eager")
_GRAPH_BACKENDS = (None, "inductor", "cudagraphs")
DEFAULT_WARMUP = 2
DEFAULT_CACHE_SIZE_LIMIT = 8  # torch._dynamo.config.cache_size_limit


# -- argument trees ------------------------------------------------------------------------------

class _Leaf:
    """Placeholder for a tensor in a flattened argument tree."""
    __slots__ = ()

    def __repr__(self):
        return "<tensor>"


_LEAF = _Leaf()


def _flatten(tree, tensors):
    """A hashable spec of tree with every Tensor replaced by _LEAF; the tensors appended in order."""
    if isinstance(tree, Tensor):
        tensors.append(tree)
        return _LEAF
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return (type(tree), tuple(_flatten(x, tensors) for x in tree))
    if isinstance(tree, (tuple, list)):
        return (type(tree), tuple(_flatten(x, tensors) for x in tree))
    if isinstance(tree, dict):
        return (dict, tuple((k, _flatten(v, tensors)) for k, v in tree.items()))
    return ("const", tree)


def _unflatten(spec, tensors):
    return _build(spec, iter(tensors))


def _build(spec, it):
    # a module-level recursion: a nested closure calling itself would form a reference cycle that keeps
    # the outputs (and their autograd nodes, which the pending-backward rule watches) alive until gc runs
    if spec is _LEAF:
        return next(it)
    kind, body = spec
    if kind == "const":
        return body
    if kind is dict:
        return {k: _build(v, it) for k, v in body}
    items = [_build(x, it) for x in body]
    return kind(*items) if hasattr(kind, "_fields") else kind(items)


def _describe_tensor(t):
    return (tuple(t._shape), t._dtype, t._storage.device, t._requires_grad)


# -- capture engines -----------------------------------------------------------------------------

class CudaGraphEngine:
    """Captures on the current CUDA device with cutegrad.graphs (private pools)."""

    def capturable(self, devices):
        return len(devices) == 1 and next(iter(devices)).type == "cuda"

    def capture(self, body, pool=None):
        from cutegrad.graphs import CUDAGraph, graph
        g = CUDAGraph()
        with graph(g, pool=pool):
            body()
        return g


def _inside_capture():
    from .cuda import capture_guard
    return capture_guard.any_capture_underway() and bool(capture_guard.thread_captures())


def _capture_error_types():
    from .cuda.errors import StreamCaptureError
    return (StreamCaptureError,)


# -- one captured signature ----------------------------------------------------------------------

class _Replay(Function):
    """Autograd node of one replay: forward replays the forward graph, backward the backward graph."""

    @staticmethod
    def forward(ctx, entry, n_inputs, *tensors):
        ctx.entry = entry
        ctx.done = False
        entry.pending = weakref.ref(ctx)
        return tuple(entry.replay_forward(tensors[:n_inputs]))

    @staticmethod
    def backward(ctx, *grads):
        entry = ctx.entry
        pending = entry.pending() if entry.pending is not None else None
        if pending is not ctx and ctx.done:
            # a second backward (retain_graph) after a newer replay rewrote the saved activations
            raise RuntimeError("cutegrad.compile: backward through an earlier call of a compiled model whose "
                               "activations a later call has overwritten (backward twice with retain_graph=True "
                               "across calls); call the model again, or compile with disable=True")
        ctx.done = True
        return (None, None) + tuple(entry.replay_backward(grads))


class _Captured:
    """The graphs, static buffers and bookkeeping of one signature."""

    def __init__(self, engine, fn, spec, args_leaves, module):
        self.pending = None  # weakref to the latest replay's _Replay node (its backward pending until .done)
        self.bwd = None
        self.module_storages = None
        if module is not None:
            self.module_storages = _module_tensors(module)
        grad_on = grad_mode.state.enabled
        self.static_inputs = []
        with grad_mode.no_grad():
            for x in args_leaves:
                s = x.detach().clone()
                self.static_inputs.append(s)
        for s, x in zip(self.static_inputs, args_leaves):
            if x._requires_grad:
                s.requires_grad_(True)
        self.spec = spec
        self.outputs = None  # flat output tensors of the last forward run (static on a real graph)
        self.out_spec = None

        def forward_body():
            with grad_mode.set_grad_enabled(grad_on):
                args, kwargs = _unflatten(spec, self.static_inputs)
                out = fn(*args, **kwargs)
            flat = []
            self.out_spec = _flatten(out, flat)
            self.outputs = flat

        # Casts cached by autocast outside the capture would be read at a fixed
        # address and never redone by a replay: capture with the cache off.
        ac = _autocast_state
        prev_cache = ac.cache_enabled
        ac.cache_enabled = False
        try:
            self.fwd = engine.capture(forward_body)
            self.diff = [i for i, o in enumerate(self.outputs) if o._requires_grad and o.grad_fn is not None]
            if grad_on and self.diff:
                self._capture_backward(engine)
        finally:
            ac.cache_enabled = prev_cache

    def _capture_backward(self, engine):
        self.input_targets = [i for i, s in enumerate(self.static_inputs) if s._requires_grad]
        self.params = _leaves_used([self.outputs[i] for i in self.diff], set(map(id, self.static_inputs)))
        targets = [self.static_inputs[i] for i in self.input_targets] + self.params
        with grad_mode.no_grad():
            self.grad_outputs = [_empty_like(self.outputs[i]) for i in self.diff]
        self.grads = None

        def backward_body():
            # retain_graph: every replay reads the saved activations at their captured addresses, so
            # they stay allocated (and the body can run again, as a backward twice with retain_graph does)
            self.grads = _autograd_grad([self.outputs[i] for i in self.diff], targets,
                                        grad_outputs=self.grad_outputs, retain_graph=True, allow_unused=True)

        self.bwd = engine.capture(backward_body, pool=_pool_of(self.fwd))

    def module_moved(self):
        """Whether a parameter or buffer the graphs read was replaced or got new storage (a move, a cast)."""
        return self.module_storages is not None and any(
            store.get(name) is not t or t._storage is not s for store, name, t, s in self.module_storages)

    def is_pending(self):
        """Whether the last replay's backward has not run yet (its node is alive and not done)."""
        ref = self.pending
        if ref is None:
            return False
        node = ref()
        return node is not None and not node.done

    # -- replay --

    def _copy_inputs(self, leaves):
        with grad_mode.no_grad():
            for s, x in zip(self.static_inputs, leaves):
                if s is not x:
                    s.copy_(x)

    def replay_forward(self, leaves):
        """Copy the inputs in, replay the forward, return copies of the differentiable outputs."""
        self._copy_inputs(leaves)
        self.fwd.replay()
        return [self.outputs[i].detach().clone() for i in self.diff]

    def replay_backward(self, grads):
        with grad_mode.no_grad():
            for buf, g in zip(self.grad_outputs, grads):
                buf.copy_(g)
            # autograd stores a first gradient as .grad without copying it: a .grad that is still
            # our static buffer must be moved out before the replay rewrites the buffer
            n_in = len(self.input_targets)
            for p, g in zip(self.params, self.grads[n_in:]):
                if g is not None and p.grad is not None and p.grad._storage is g._storage:
                    p.grad = g.clone()
            self.bwd.replay()
            out_inputs = [None] * len(self.static_inputs)
            for j, i in enumerate(self.input_targets):
                g = self.grads[j]
                out_inputs[i] = None if g is None else g.clone()
        return out_inputs + list(self.grads[n_in:])

    def run(self, leaves):
        """One call of this signature on the graphs; the outputs in the callable's structure."""
        if self.bwd is None:
            with grad_mode.no_grad():
                self._copy_inputs(leaves)
                self.fwd.replay()
                flat = [o.detach().clone() for o in self.outputs]
            return _unflatten(self.out_spec, flat)
        diff_outs = _Replay.apply(self, len(leaves), *leaves, *self.params)
        flat = list(self.outputs)
        with grad_mode.no_grad():
            diff = set(self.diff)
            flat = [o if i in diff else o.detach().clone() for i, o in enumerate(flat)]
        for i, t in zip(self.diff, diff_outs):
            flat[i] = t
        return _unflatten(self.out_spec, flat)


def _pool_of(g):
    pool = getattr(g, "pool", None)
    return pool() if callable(pool) else None


def _empty_like(t):
    from .ops import empty_like
    return empty_like(t)


def _leaves_used(outputs, exclude):
    """Leaf tensors requiring grad that the outputs' autograd graph reaches (the parameters used), in order."""
    seen, found, stack = set(), [], [o.grad_fn for o in reversed(outputs)]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, AccumulateGrad):
            if id(node.variable) not in exclude:
                found.append(node.variable)
            continue
        stack.extend(reversed([n for n in node.next_functions if n is not None]))
    return found


def _module_tensors(module):
    """(store, name, tensor, storage) for every parameter and buffer: what module_moved compares against."""
    return [(store, name, t, t._storage) for m in module.modules() for store in (m._parameters, m._buffers)
            for name, t in store.items() if t is not None]


# -- the compiled callable -----------------------------------------------------------------------

class CompiledCallable:
    """fn with per-signature CUDA graph capture (see the module docstring)."""

    def __init__(self, fn, module=None, fullgraph=False, warmup=DEFAULT_WARMUP,
                 cache_size_limit=DEFAULT_CACHE_SIZE_LIMIT, engine=None):
        self.fn = fn
        self.module = module
        self.fullgraph = fullgraph
        self.warmup = warmup
        self.cache_size_limit = cache_size_limit
        self.engine = engine if engine is not None else CudaGraphEngine()
        self.entries = {}  # signature -> calls so far (int) while warming up, then a _Captured
        self.eager_reason = None
        self._warned_cache = False
        functools.update_wrapper(self, fn, updated=())

    def __getstate__(self):
        # copies and pickles start uncaptured: graphs and static buffers belong to this object's device memory
        state = dict(self.__dict__)
        state["entries"], state["eager_reason"], state["_warned_cache"] = {}, None, False
        return state

    def __call__(self, *args, **kwargs):
        if self.eager_reason is not None or _inside_capture():
            # inside another capture (graphed(step) around a compiled model) the outer graph records the ops
            return self.fn(*args, **kwargs)
        leaves = []
        spec = _flatten((args, kwargs), leaves)
        devices = {t._storage.device for t in leaves}
        if not self.engine.capturable(devices):
            return self.fn(*args, **kwargs)
        key = self._signature(spec, leaves)
        try:
            entry = self.entries.get(key)
        except TypeError:  # an unhashable non-tensor argument: no signature to cache under
            return self.fn(*args, **kwargs)
        if entry is None:
            if len(self.entries) >= self.cache_size_limit:
                if not self._warned_cache:
                    self._warned_cache = True
                    warnings.warn(f"cutegrad.compile: {self._name()} reached cache_size_limit="
                                  f"{self.cache_size_limit} captured signatures; calls with new shapes, dtypes "
                                  "or arguments run eagerly", stacklevel=2)
                return self.fn(*args, **kwargs)
            entry = 0
        if isinstance(entry, int):
            if entry < self.warmup:
                self.entries[key] = entry + 1
                return self.fn(*args, **kwargs)
            entry = self._capture(key, spec, leaves)
            if entry is None:
                return self.fn(*args, **kwargs)
        elif entry.module_moved():
            self.entries[key] = 0  # the module's tensors moved: warm up and capture anew
            return self.fn(*args, **kwargs)
        if entry.is_pending():
            return self.fn(*args, **kwargs)
        return entry.run(leaves)

    def _signature(self, spec, leaves):
        ac = _autocast_state.dtypes
        training = self.module.training if self.module is not None else None
        return (spec, tuple(_describe_tensor(t) for t in leaves), grad_mode.state.enabled,
                (ac[0], ac[1]), training)

    def _name(self):
        return type(self.module).__name__ if self.module is not None else getattr(self.fn, "__name__", "fn")

    def _capture(self, key, spec, leaves):
        try:
            entry = _Captured(self.engine, self.fn, spec, leaves, self.module)
        except _capture_error_types() as exc:
            if self.fullgraph:
                raise
            self.eager_reason = str(exc)
            self.entries.clear()
            warnings.warn(f"cutegrad.compile: {self._name()} runs eagerly from now on: capturing it into a CUDA "
                          f"graph failed: {exc}", stacklevel=3)
            return None
        self.entries[key] = entry
        return entry


def _check_options(mode, backend, options, dynamic, fullgraph):
    if mode not in _MODES:
        raise ValueError(f"cutegrad.compile: unknown mode {mode!r}; expected one of {_MODES}")
    if backend is not None and not isinstance(backend, str):
        raise ValueError("cutegrad.compile: custom backends (callables) are not supported; cutegrad's compile "
                         "is CUDA graph capture (backend None, 'inductor', 'cudagraphs' or 'eager')")
    if backend is not None and backend not in _GRAPH_BACKENDS + _EAGER_BACKENDS:
        raise ValueError(f"cutegrad.compile: unknown backend {backend!r}; expected one of "
                         f"{_GRAPH_BACKENDS + _EAGER_BACKENDS}")
    if dynamic not in (None, True, False):
        raise ValueError(f"cutegrad.compile: dynamic must be None, True or False, got {dynamic!r}")
    if not isinstance(fullgraph, bool):
        raise ValueError(f"cutegrad.compile: fullgraph must be a bool, got {fullgraph!r}")
    opts = dict(options or {})
    warmup = opts.pop("warmup", DEFAULT_WARMUP)
    limit = opts.pop("cache_size_limit", DEFAULT_CACHE_SIZE_LIMIT)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"cutegrad.compile: options['warmup'] must be an int >= 1, got {warmup!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"cutegrad.compile: options['cache_size_limit'] must be an int >= 0, got {limit!r}")
    if opts:
        # torch's inductor options (epilogue_fusion, max_autotune, ...) have no meaning here
        warnings.warn(f"cutegrad.compile: ignoring options {sorted(opts)} (cutegrad reads 'warmup' and "
                      "'cache_size_limit')", stacklevel=3)
    return warmup, limit


def compile(model=None, *, fullgraph=False, dynamic=None, backend=None, mode=None, options=None, disable=False,
            _engine=None):
    """torch.compile's signature; CUDA graph capture per input signature (see cutegrad.compile's module doc).

    model: an nn.Module (compiled in place and returned) or a function (a
    wrapper is returned); None returns a decorator. mode
    "max-autotune-no-cudagraphs", backend "eager"/"aot_eager" and disable=True
    leave the model as it is. dynamic is accepted: shapes are always
    specialised (one capture per signature). options: {"warmup": eager calls
    per signature before capture (default 2), "cache_size_limit": signatures
    captured per callable (default 8)}.
    """
    warmup, limit = _check_options(mode, backend, options, dynamic, fullgraph)
    if model is None:
        return lambda m: compile(m, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode,
                                 options=options, disable=disable, _engine=_engine)
    if disable or mode == "max-autotune-no-cudagraphs" or backend in _EAGER_BACKENDS:
        return model
    from .nn.module import Module
    if isinstance(model, Module):
        forward = model.forward
        if isinstance(forward, CompiledCallable):
            forward = forward.fn  # compiling twice recompiles the original forward
        object.__setattr__(model, "forward", CompiledCallable(forward, model, fullgraph, warmup, limit, _engine))
        if "_orig_mod" not in model.__dict__:
            object.__setattr__(model, "_orig_mod", model)
        return model
    if not callable(model):
        raise TypeError(f"cutegrad.compile: expected an nn.Module or a callable, got {type(model).__name__}")
    if isinstance(model, CompiledCallable):
        model = model.fn
    return CompiledCallable(model, None, fullgraph, warmup, limit, _engine)


__all__ = ["compile", "CompiledCallable", "CudaGraphEngine"]
