"""Low-precision copies of float32 master weights, kept across steps so that
autocast casts no weight in a training step.

Autocast's first cast of a CUDA parameter (frontend/autocast.py) records the
bfloat16/float16 copy here with the parameter's version.  The fused AdamW/SGD
kernels write the updated parameter into that copy in the same pass
(`shadows_for` hands them the valid copies; `refresh` then marks each copy as
current again), so the next forward's cast is a lookup, not a kernel.  Any
other in-place change of the parameter moves its version and the copy is
recast on the next use.  One copy per parameter: memory of half the weights.
"""
import weakref

_shadows = {}  # id(parameter) -> (weak reference to it, shadow tensor, parameter version the shadow matches)


def _forget_id(key):
    def drop(_ref):
        _shadows.pop(key, None)
    return drop


def lookup(p, dtype):
    """The current dtype copy of parameter p, or None."""
    entry = _shadows.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    shadow = entry[1]
    if shadow._dtype is not dtype or entry[2] != p._storage.version:
        return None
    return shadow


def remember(p, shadow):
    """Record shadow (a dtype copy of p's current values, no autograd history) as p's copy."""
    key = id(p)
    _shadows[key] = (weakref.ref(p, _forget_id(key)), shadow, p._storage.version)


def shadows_for(params):
    """(list of the current copies or None, one per parameter, their dtype or None).

    Only copies of one dtype go to one launch; copies of another dtype or out of
    date are forgotten, since the update about to run would leave them stale."""
    out, dtype = [], None
    for p in params:
        entry = _shadows.get(id(p))
        shadow = None
        if entry is not None and entry[0]() is p:
            if entry[2] == p._storage.version and dtype in (None, entry[1]._dtype):
                shadow, dtype = entry[1], entry[1]._dtype
            else:
                del _shadows[id(p)]
        out.append(shadow)
    return out, dtype


def refresh(params, shadows):
    """After an update that wrote each non-None shadow: they match their parameters again."""
    for p, shadow in zip(params, shadows):
        if shadow is not None:
            remember(p, shadow)


def clear():
    _shadows.clear()
