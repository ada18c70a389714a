"""Reverse-mode autograd: graph nodes and the engine that runs them.

Every differentiable op records one Node per output. A Node knows the nodes
that produced its inputs (`next_functions`, None where no gradient flows) and
maps the gradient of its output to gradients of its inputs with `backward`,
written in terms of cutegrad ops so it runs on every backend and, under
create_graph, is itself differentiable.

The engine counts, for each reachable node, how many consumers feed it, then
runs nodes once all their gradient contributions have arrived, summing them.
Tensors saved for backward carry the storage version seen at save time; a
mismatch at backward time means an in-place op clobbered them.

An op records its node with one call next to its kernel call, and the node's
class (the op's gradient) sits beside the op:

    class ScaleBackward(Node):
        __slots__ = ("factor",)

        def __init__(self, factor):
            self.factor = factor

        def backward(self, g):
            return (mul(g, self.factor),)

    def scale(x, factor):
        return ScaleBackward.record(kernel(x, factor), (x,), (), factor)

`Node.record(out, inputs, saved, *state)` does nothing but return `out` unless
grad mode is on and an input requires grad; then it builds one node
(`cls(*state)`), saves `saved` with their versions (and `out` itself, last,
with `save_output=True`) and attaches the node to `out`. The older spelling --
build the node, `save`, `attach` -- keeps working.
"""
import weakref

from . import grad_mode
from ..tensor import _STRIDES, make

_grad_state = grad_mode.state


class Node:
    __slots__ = ("next_functions", "_saved", "_pre_hooks", "__weakref__")

    def __init__(self):
        self._saved = ()
        self._pre_hooks = None

    def backward(self, grad):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @classmethod
    def record(cls, out, inputs, saved=(), *state, save_output=False):
        """`out` as the result of an op on `inputs` (Tensors or None) whose gradient this class computes.

        Records a `cls(*state)` node saving `saved` (and `out` after them with
        save_output, without a reference cycle: see save_with_output) when grad
        mode is on and an input requires grad; returns `out` either way.
        """
        if not _grad_state.enabled:
            return out
        for t in inputs:
            if t is not None and t._requires_grad:
                break
        else:
            return out
        node = cls(*state)
        node._pre_hooks = None
        if save_output:
            node.save_with_output(out, *saved)
        else:
            node._saved = tuple([(t, t._storage.version, False) if t is not None else None for t in saved])
        return attach(out, node, inputs)

    def name(self):
        return type(self).__name__

    def save(self, *tensors):
        """Save inputs for backward (with their versions)."""
        self._saved = tuple([(t, t._storage.version, False) if t is not None else None for t in tensors])

    def save_with_output(self, out, *tensors):
        """Save inputs plus this node's own output, stored without a reference
        back to the node so no cycle keeps memory alive."""
        alias = make(out._storage, out._shape, out._strides, out._offset, out._dtype)
        self._saved = tuple([(t, t._storage.version, False) if t is not None else None for t in tensors] +
                            [(alias, out._storage.version, True)])

    @property
    def saved_tensors(self):
        saved = self._saved
        if saved is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved tensors "
                "after they have already been freed). Saved intermediate values of the graph are freed "
                "when you call .backward() or autograd.grad(). Specify retain_graph=True if you need to "
                "backward through the graph a second time or if you need to access saved tensors after "
                "calling backward.")
        out = []
        for entry in saved:
            if entry is None:
                out.append(None)
                continue
            t, version, is_output = entry
            if t._storage.version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: [{t._dtype} tensor of shape {list(t._shape)}], which is output 0 of "
                    f"{self.name()}, is at version {t._storage.version}; expected version {version} instead."
                    if is_output else
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: [{t._dtype} tensor of shape {list(t._shape)}] is at version "
                    f"{t._storage.version}; expected version {version} instead.")
            if is_output and grad_mode.state.enabled:
                t = make(t._storage, t._shape, t._strides, t._offset, t._dtype)
                t.grad_fn = self
                t._requires_grad = True
            out.append(t)
        return out

    def release(self):
        self._saved = None

    def register_prehook(self, fn):
        if self._pre_hooks is None:
            self._pre_hooks = []
        self._pre_hooks.append(fn)
        return _HookHandle(self._pre_hooks, fn)

    def __repr__(self):
        return f"<{self.name()}>"


class AccumulateGrad(Node):
    """Sink for a leaf tensor: adds the arriving gradient into `.grad`."""

    __slots__ = ("variable",)

    def __init__(self, variable):
        super().__init__()
        self.variable = variable
        self.next_functions = ()

    def backward(self, grad):
        var = self.variable
        if grad._shape != var._shape:
            raise RuntimeError(f"gradient of shape {list(grad._shape)} does not match leaf of shape {list(var._shape)}")
        if grad._strides is not _STRIDES.get(grad._shape) and not grad.is_contiguous():
            # Backward formulas hand out views (a sum's gradient is an expand,
            # stride 0): `.grad` must own dense memory, or an in-place update
            # of it (optimizers, grad.add_) would write one element many times.
            grad = grad.contiguous()
        if not _grad_state.enabled:
            grad = make(grad._storage, grad._shape, grad._strides, grad._offset, grad._dtype)  # grad.detach()
        old = var._grad
        var.grad = grad if old is None else old + grad
        return ()


class _HookHandle:
    __slots__ = ("_list", "_fn")

    def __init__(self, lst, fn):
        self._list, self._fn = lst, fn

    def remove(self):
        if self._fn in self._list:
            self._list.remove(self._fn)


def edge(t):
    """The node a gradient for tensor t flows into (None if t needs none)."""
    fn = t.grad_fn
    if fn is not None:
        base = t._base
        if base is not None and t._base_fn is not base.grad_fn:
            # An in-place op rewrote the base's history after this view was
            # made (through the base or another view): the view's gradient
            # must now flow into the new history, as torch regenerates it.
            from ..ops.inplace import refresh_view_history
            fn = refresh_view_history(t)
        return fn
    if not t._requires_grad:
        return None
    acc = t._accum
    if acc is None:
        acc = t._accum = AccumulateGrad(t)
    return acc


def attach(out, node, inputs):
    """Record node as the producer of out, with inputs' edges."""
    edges = []
    for t in inputs:  # edge(t), inlined: this runs for every recorded op
        if t is None:
            edges.append(None)
            continue
        fn = t.grad_fn
        if fn is not None:
            edges.append(fn if t._base is None else edge(t))
        elif t._requires_grad:
            acc = t._accum
            if acc is None:
                acc = t._accum = AccumulateGrad(t)
            edges.append(acc)
        else:
            edges.append(None)
    node.next_functions = tuple(edges)
    out.grad_fn = node
    out._requires_grad = True
    if out._base is not None:
        out._base_fn = out._base.grad_fn  # the base history this view's node hangs off
    return out


def register_tensor_hook(t, hook):
    return edge(t).register_prehook(hook)


def add_retain_grad_hook(t):
    ref = weakref.ref(t)

    def retain(grad):
        tensor = ref()
        if tensor is not None:
            g = grad.detach().clone()  # the engine passes grad on: .grad must not alias it
            tensor.grad = g if tensor.grad is None else tensor.grad + g
        return None
    retain.retains_grad_of = ref  # lets an in-place op move it to t's new grad_fn
    t.grad_fn.register_prehook(retain)


def _topo_dependencies(roots):
    """({node: number of edges into it}, every node reachable from roots). Nodes hash by identity."""
    deps = {}
    stack = list(roots)
    nodes = list(dict.fromkeys(roots))
    for r in nodes:
        deps.setdefault(r, 0)
    while stack:
        for nxt in stack.pop().next_functions:
            if nxt is None:
                continue
            n = deps.get(nxt)
            if n is None:  # first edge into nxt: a new node to walk
                deps[nxt] = 1
                nodes.append(nxt)
                stack.append(nxt)
            else:
                deps[nxt] = n + 1
    return deps, nodes


def _needed(nodes, targets):
    """Nodes from which some target is reachable (only those must run):
    a walk up the reversed edges from the targets, linear in the graph."""
    parents = {}
    for node in nodes:
        for nxt in node.next_functions:
            if nxt is not None:
                parents.setdefault(nxt, []).append(node)
    needed = set(targets)
    stack = list(needed)
    while stack:
        for parent in parents.get(stack.pop(), ()):
            if parent not in needed:
                needed.add(parent)
                stack.append(parent)
    return needed


def run_backward(roots, root_grads, retain_graph, create_graph, capture=None):
    """Run the graph from roots. capture: {node: index} -> returns grads arriving there."""
    deps, nodes = _topo_dependencies(roots)
    needed = _needed(nodes, capture.keys()) if capture is not None else None
    captured = [None] * len(capture) if capture is not None else None
    buffers = {}
    for r, g in zip(roots, root_grads):
        buffers[r] = g if r not in buffers else buffers[r] + g
    ready = [r for r in dict.fromkeys(roots) if deps[r] == 0]
    outer_accumulate = _grad_state.accumulate_into_leaves
    _grad_state.accumulate_into_leaves = capture is None and not create_graph
    try:
        with grad_mode.set_grad_enabled(create_graph):
            _run_ready(ready, deps, buffers, retain_graph, capture, captured, needed)
    finally:  # a backward run inside a node or hook must not leave its own setting behind
        _grad_state.accumulate_into_leaves = outer_accumulate
    return captured


def _run_ready(ready, deps, buffers, retain_graph, capture, captured, needed):
    """run_backward's loop: run each node once its consumers have all delivered."""
    while ready:
        node = ready.pop()
        grad = buffers.pop(node, None)
        if grad is None:  # every consumer returned None: nothing flows on
            for nxt in node.next_functions:
                if nxt is not None:
                    _arrive(nxt, deps, ready)
            continue
        if node._pre_hooks:
            for hook in list(node._pre_hooks):
                res = hook(grad)
                if res is not None:
                    grad = res
        if capture is not None and node in capture:
            captured[capture[node]] = grad
            if isinstance(node, AccumulateGrad):
                continue
        if needed is not None and node not in needed:
            continue
        grads = node.backward(grad)
        if not retain_graph:
            node.release()
        edges = node.next_functions
        for i, (nxt, g) in enumerate(zip(edges, grads)):
            if nxt is None:
                continue
            if g is not None:
                # One gradient object handed to two places must not alias:
                # leaves keep `.grad` and optimizers mutate it in place.
                if i:
                    for j in range(i):
                        if grads[j] is g and edges[j] is not None:
                            g = g.clone()
                            break
                prev = buffers.get(nxt)
                buffers[nxt] = g if prev is None else prev + g
            n = deps[nxt] - 1  # _arrive, inlined: this loop runs once per edge of the graph
            deps[nxt] = n
            if n == 0:
                ready.append(nxt)


def _arrive(nxt, deps, ready):
    n = deps[nxt] - 1
    deps[nxt] = n
    if n == 0:
        ready.append(nxt)


def _root_grads(tensors, grad_tensors):
    from .. import ops
    out = []
    for t, g in zip(tensors, grad_tensors):
        if g is None:
            if t.numel() != 1:
                raise RuntimeError(f"grad can be implicitly created only for scalar outputs; got a tensor of "
                                   f"shape {list(t._shape)}: pass gradient= to backward()")
            g = ops.ones_like(t)
        else:
            if g._shape != t._shape:
                raise RuntimeError(f"Mismatch in shape: grad_output has a shape of {list(g._shape)} and output "
                                   f"has a shape of {list(t._shape)}")
            # The caller keeps its tensor: a leaf's .grad must not alias it.
            g = g.clone()
        out.append(g)
    return out


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    from ..tensor import Tensor
    if isinstance(tensors, Tensor):
        tensors = (tensors,)
    if grad_tensors is None or isinstance(grad_tensors, Tensor):
        grad_tensors = (grad_tensors,) * len(tensors) if grad_tensors is None else (grad_tensors,)
    if retain_graph is None:
        retain_graph = create_graph
    for t in tensors:
        if not t._requires_grad:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    roots = [edge(t) for t in tensors]
    grads = _root_grads(tensors, grad_tensors)
    if inputs is not None:
        if isinstance(inputs, Tensor):
            inputs = (inputs,)
        capture = {edge(t): i for i, t in enumerate(inputs)}
        got = run_backward(roots, grads, retain_graph, create_graph, capture)
        for t, g in zip(inputs, got):
            if g is None:
                continue
            g = g if create_graph else g.detach()
            t.grad = g if t.grad is None else t.grad + g
        return
    run_backward(roots, grads, retain_graph, create_graph)


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=False):
    """Gradients of outputs with respect to inputs, without touching `.grad`."""
    from ..tensor import Tensor
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    single = isinstance(inputs, Tensor)
    if single:
        inputs = (inputs,)
    if grad_outputs is None or isinstance(grad_outputs, Tensor):
        grad_outputs = (grad_outputs,) * len(outputs) if grad_outputs is None else (grad_outputs,)
    if retain_graph is None:
        retain_graph = create_graph
    for t in outputs:
        if not t._requires_grad:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    for t in inputs:
        if not t._requires_grad:
            raise RuntimeError("One of the differentiated Tensors does not require grad")
    roots = [edge(t) for t in outputs]
    capture = {}
    for i, t in enumerate(inputs):
        capture.setdefault(edge(t), i)
    got = run_backward(roots, _root_grads(outputs, grad_outputs), retain_graph, create_graph, capture)
    result = []
    for t in inputs:
        g = got[capture[edge(t)]]
        if g is None and not allow_unused:
            raise RuntimeError("One of the differentiated Tensors appears to not have been used in the graph. "
                               "Set allow_unused=True if this is the desired behavior.")
        if g is not None and not create_graph:
            g = g.detach()
        result.append(g)
    return tuple(result)
