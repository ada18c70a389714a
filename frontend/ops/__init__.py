"""Every op of cutegrad, importable from here and re-exported at top level."""
from .creation import (tensor, from_numpy, as_tensor, empty, full, zeros, ones, zeros_like, ones_like, full_like,
                       empty_like, rand_like, randn_like, arange, linspace, eye, rand, randn, randint, randperm,
                       uniform_, normal_, multinomial)
from .conversion import to, to_dtype, to_device, clone, contiguous, detach
from .pointwise import (add, sub, rsub, mul, div, pow, maximum, minimum, floor_divide, remainder, eq, ne, lt, le,
                        gt, ge, logical_and, logical_or, logical_xor, logical_not, neg, exp, log, sqrt, rsqrt, abs,
                        tanh, sigmoid, relu, gelu, silu, sign, sin, cos, reciprocal, square, erf, log1p, expm1,
                        floor, ceil, round, trunc, isnan, isinf, isfinite, where, clamp, masked_fill, clamp_min,
                        clamp_max, log2, log10, lerp, addcmul, addcdiv, isclose, allclose, equal)
from .inplace import (add_, sub_, mul_, div_, pow_, masked_fill_, clamp_, relu_, neg_, exp_, sqrt_, tanh_,
                      sigmoid_, copy_, fill_, zero_, index_put_, abs_, log_, rsqrt_, lerp_, addcmul_, addcdiv_)
from .reduction import (sum, mean, max, min, amax, amin, argmax, argmin, any, all, prod, var, std, logsumexp,
                        norm, var_mean, std_mean)
from .shape import (view, reshape, flatten, unflatten, permute, transpose, t, movedim, expand, expand_as,
                    broadcast_to, unsqueeze, squeeze, as_strided, narrow, select, split, chunk, unbind, cat, stack,
                    repeat, flip)
from .broadcast import broadcast_shapes
from .indexing import (getitem, setitem, gather, scatter_add, index_select, index_add, one_hot, nonzero,
                       masked_select)
from .linalg import matmul, mm, bmm, linear, outer
from .sorting import sort, argsort, topk, cumsum
from .nn import (softmax, log_softmax, cross_entropy, nll_loss, mse_loss, layer_norm, rms_norm, embedding, dropout,
                 tril, triu)
from .attention import scaled_dot_product_attention
from .einsum import einsum
from .unique import unique
from .predicates import is_tensor
from .conv import conv2d
from .pooling import max_pool2d, avg_pool2d, adaptive_avg_pool2d
from .normalization import batch_norm
from .fused_norms import add_layer_norm, add_rms_norm

concat = cat
clip = clamp
true_divide = div
multiply = mul
subtract = sub
negative = neg
greater = gt
less = lt
argwhere = nonzero

# The public op names; the family submodules (ops.nn, ops.shape, ...) stay
# out so `from cutegrad.ops import *` cannot shadow cutegrad.nn and friends.
__all__ = [_n for _n, _v in list(globals().items())
           if not _n.startswith("_") and type(_v).__name__ != "module"]
