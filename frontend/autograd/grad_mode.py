"""Whether operations record autograd history, per thread (like torch)."""
import threading


class _State(threading.local):
    enabled = True
    # True while the engine runs a backward() whose every reached leaf sums its gradient into
    # `.grad` and nothing else sees it (no inputs=, not autograd.grad, not create_graph). A node
    # may then add its contribution for a leaf whose AccumulateGrad has no hooks straight into
    # that leaf's existing dense `.grad`, in place, and pass None along that edge instead
    # (PyTorch's AccumulateGrad also adds into an existing `.grad` in place outside grad mode).
    accumulate_into_leaves = False


state = _State()


def is_grad_enabled():
    return state.enabled


class _Mode:
    __slots__ = ("_prev", "_flag")

    def __init__(self, flag):
        self._flag = flag

    def __enter__(self):
        self._prev = state.enabled
        state.enabled = self._flag
        return self

    def __exit__(self, *exc):
        state.enabled = self._prev
        return False

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with type(self)(*self._args()):
                return fn(*args, **kwargs)
        return wrapper

    def _args(self):
        return ()


class no_grad(_Mode):
    """Disable graph recording inside the block (or decorated function)."""

    def __init__(self):
        super().__init__(False)


class enable_grad(_Mode):
    def __init__(self):
        super().__init__(True)


class set_grad_enabled(_Mode):
    """Like torch's: takes effect when called, so `set_grad_enabled(False)` on
    its own line switches recording off; as a context manager or decorator it
    restores the previous mode afterwards."""

    def __init__(self, mode):
        super().__init__(bool(mode))
        self._prev = state.enabled
        state.enabled = self._flag

    def __enter__(self):
        return self

    def __call__(self, fn):
        state.enabled = self._prev  # decorating must not change the mode now
        return super().__call__(fn)

    def _args(self):
        return (self._flag,)


class inference_mode(_Mode):
    """Like no_grad: cutegrad has no separate inference-tensor kind, so the
    only effect is that nothing is recorded (see docs/architecture.md)."""

    def __init__(self, mode=True):
        super().__init__(not mode)

    def _args(self):
        return (not self._flag,)
