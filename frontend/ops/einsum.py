"""einsum: Einstein summation over batched matmuls.

The equation is parsed once: "..." becomes placeholder subscripts (right-
aligned, size-1 dims broadcast as torch's), a subscript repeated within one
operand takes that operand's diagonal (an as_strided view), subscripts that
appear in one operand only and not in the output are summed first. Operands
are then contracted left to right, each pair as one bmm of
(batch, own, contracted) x (batch, contracted, own) permutations, so the work
goes to the GEMM and the gradient comes from permute/reshape/matmul.
"""
import builtins
import math

from ..tensor import Tensor
from . import reduction as R
from . import shape as S
from .linalg import matmul

_ELLIPSIS_BASE = 0x2460  # placeholder subscripts for "..." dims (any characters outside a-zA-Z do)


def _parse(equation, operands):
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise ValueError(f"einsum(): the equation {equation!r} has {len(terms)} operand(s) but {len(operands)} "
                         f"tensor(s) were given")
    n_ell = 0
    for term, op in zip(terms, operands):
        letters = term.replace("...", "")
        if not all(c.isascii() and c.isalpha() for c in letters) or term.count("...") > 1 or "." in letters:
            raise ValueError(f"einsum(): invalid subscripts {term!r} in {equation!r}: use letters a-z, A-Z and at "
                             f"most one '...'")
        extra = len(op._shape) - len(letters)
        if extra < 0 or (extra and "..." not in term):
            raise RuntimeError(f"einsum(): subscripts {term!r} do not match an operand of {len(op._shape)} dims "
                               f"(shape {list(op._shape)})")
        n_ell = builtins.max(n_ell, extra)
    ell = "".join(chr(_ELLIPSIS_BASE + i) for i in range(n_ell))
    subs = []
    for term, op in zip(terms, operands):
        letters = term.replace("...", "")
        k = len(op._shape) - len(letters)
        subs.append(term.replace("...", ell[n_ell - k:]) if "..." in term else term)
    if arrow:
        if rhs.count("...") > 1 or not all(c.isascii() and c.isalpha() for c in rhs.replace("...", "")):
            raise ValueError(f"einsum(): invalid output subscripts {rhs!r} in {equation!r}")
        out = rhs.replace("...", ell)
        seen = "".join(subs)
        for c in out:
            if out.count(c) > 1:
                raise ValueError(f"einsum(): output subscript {c!r} appears more than once in {equation!r}")
            if c not in seen:
                raise ValueError(f"einsum(): output subscript {c!r} does not appear in the operands of {equation!r}")
    else:
        joined = "".join(subs)
        out = ell + "".join(sorted(c for c in set(joined) if c.isascii() and joined.count(c) == 1))
    return subs, out


def _diagonals(x, sub):
    """Take the diagonal of every subscript that repeats within one operand ("ii" -> "i")."""
    from .conversion import contiguous
    while len(set(sub)) != len(sub):
        c = next(c for c in sub if sub.count(c) > 1)
        i, j = sub.index(c), sub.index(c, sub.index(c) + 1)
        if x._shape[i] != x._shape[j]:
            raise RuntimeError(f"einsum(): subscript {c!r} is repeated for dims of sizes {x._shape[i]} and "
                               f"{x._shape[j]}")
        x = contiguous(x)
        shape = [n for k, n in enumerate(x._shape) if k != j]
        strides = [st + (x._strides[j] if k == i else 0) for k, st in enumerate(x._strides) if k != j]
        x = S.as_strided(x, shape, strides, 0)
        sub = sub[:j] + sub[j + 1:]
    return x, sub


def _sum_out(x, sub, keep):
    dims = tuple(k for k, c in enumerate(sub) if c not in keep)
    if not dims:
        return x, sub
    return R.sum(x, dims), "".join(c for c in sub if c in keep)


def _arranged(x, sub, order, sizes):
    """x permuted to `order` and its size-1 broadcast dims expanded to the subscripts' sizes."""
    x = S.permute(x, [sub.index(c) for c in order]) if list(order) != list(sub) else x
    target = [sizes[c] for c in order]
    return S.expand(x, target) if list(x._shape) != target else x


def _contract(a, sa, b, sb, keep, sizes):
    batch = [c for c in sa if c in sb and c in keep]
    summed = [c for c in sa if c in sb and c not in keep]
    a_own = [c for c in sa if c not in sb]
    b_own = [c for c in sb if c not in sa]
    a = _arranged(a, sa, batch + a_own + summed, sizes)
    b = _arranged(b, sb, batch + summed + b_own, sizes)
    nb, m, k, n = (math.prod(sizes[c] for c in g) for g in (batch, a_own, summed, b_own))
    out = matmul(S.reshape(a, (nb, m, k)), S.reshape(b, (nb, k, n)))
    letters = batch + a_own + b_own
    return S.reshape(out, [sizes[c] for c in letters]), "".join(letters)


def einsum(equation, *operands):
    """torch.einsum(equation, *operands) (operands may also be given as one list)."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        raise TypeError(f"einsum(): the equation must be a str, got {type(equation).__name__}")
    if not operands:
        raise ValueError("einsum(): must provide at least one operand")
    for i, op in enumerate(operands):
        if not isinstance(op, Tensor):
            raise TypeError(f"einsum(): operand {i} is a {type(op).__name__}, not a Tensor")
    subs, out = _parse(equation, operands)
    sizes = {}
    for sub, op in zip(subs, operands):
        for c, n in zip(sub, op._shape):
            prev = sizes.get(c, 1)
            if n != prev and 1 not in (n, prev):  # size-1 dims broadcast
                raise RuntimeError(f"einsum(): subscript {c!r} has size {n} for one operand but {prev} for "
                                   f"another (operand shapes {[list(o._shape) for o in operands]})")
            sizes[c] = builtins.max(prev, n)
    ops_, subs_ = [], []
    for idx, (sub, op) in enumerate(zip(subs, operands)):
        op, sub = _diagonals(op, sub)
        elsewhere = set(out).union(*(set(s) for k, s in enumerate(subs) if k != idx))
        op, sub = _sum_out(op, sub, elsewhere)
        ops_.append(op)
        subs_.append(sub)
    cur, sc = ops_[0], subs_[0]
    for idx in range(1, len(ops_)):
        keep = set(out).union(*(set(s) for s in subs_[idx + 1:]))
        cur, sc = _sum_out(cur, sc, keep | set(subs_[idx]))
        cur, sc = _contract(cur, sc, ops_[idx], subs_[idx], keep, sizes)
    cur, sc = _sum_out(cur, sc, set(out))
    cur = _arranged(cur, sc, out, sizes)
    return cur
