"""Parameter initialisation (torch.nn.init names and formulas), under no_grad."""
import math

from ..autograd import grad_mode
from .. import ops


def calculate_gain(nonlinearity, param=None):
    linear = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
              "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def _calculate_fan_in_and_fan_out(tensor):
    if tensor.dim() < 2:
        raise ValueError("Fan in and fan out can not be computed for tensor with fewer than 2 dimensions")
    receptive = 1
    for s in tensor.shape[2:]:
        receptive *= s
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _fill(tensor, src):
    with grad_mode.no_grad():
        tensor.copy_(src)
    return tensor


def uniform_(tensor, a=0.0, b=1.0, generator=None):
    return _fill(tensor, ops.rand_like(tensor, generator=generator) * (b - a) + a)


def normal_(tensor, mean=0.0, std=1.0, generator=None):
    return _fill(tensor, ops.randn_like(tensor, generator=generator) * std + mean)


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    """Normal(mean, std) truncated to [a, b] by inverse-CDF sampling."""
    import numpy as np
    from ..ops.special import erf
    from ..random import cpu_generator

    def cdf(x):
        return (1.0 + float(erf(np.array(x / math.sqrt(2.0))))) / 2.0
    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    g = generator or cpu_generator()
    u = g.numpy().uniform(2 * lo - 1, 2 * hi - 1, size=tuple(tensor.shape))
    z = _erfinv(u)
    vals = np.clip(z * std * math.sqrt(2.0) + mean, a, b)
    return _fill(tensor, ops.tensor(vals, dtype=tensor.dtype, device=tensor.device))


def _erfinv(y):
    """Inverse error function by Newton iterations on erf (float64)."""
    import numpy as np
    from ..ops.special import erf
    y = np.clip(y, -1 + 1e-15, 1 - 1e-15)
    # Giles' single-precision approximation as the starting point
    w = -np.log((1.0 - y) * (1.0 + y))
    x = np.where(w < 5.0, _giles_small(w - 2.5), _giles_large(np.sqrt(np.maximum(w, 5.0)) - 3.0)) * y
    for _ in range(3):
        err = erf(x) - y
        x = x - err / (2.0 / math.sqrt(math.pi) * np.exp(-x * x))
    return x


def _giles_small(w):
    p = 2.81022636e-08
    for c in (3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503, -0.00417768164,
              0.246640727, 1.50140941):
        p = c + p * w
    return p


def _giles_large(w):
    p = -0.000200214257
    for c in (0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613, 0.00943887047,
              1.00167406, 2.83297682):
        p = c + p * w
    return p


def zeros_(tensor):
    with grad_mode.no_grad():
        return tensor.zero_()


def ones_(tensor):
    with grad_mode.no_grad():
        return tensor.fill_(1.0)


def constant_(tensor, val):
    with grad_mode.no_grad():
        return tensor.fill_(val)


def xavier_uniform_(tensor, gain=1.0, generator=None):
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    a = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -a, a, generator)


def xavier_normal_(tensor, gain=1.0, generator=None):
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator)


def _fan(tensor, mode):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of fan_in, fan_out")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    bound = math.sqrt(3.0) * calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return uniform_(tensor, -bound, bound, generator)


def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return normal_(tensor, 0.0, std, generator)
