"""Activation modules and Dropout."""
from .. import ops
from .module import Module


class GELU(Module):
    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return ops.gelu(x, self.approximate)

    def extra_repr(self):
        return f"approximate='{self.approximate}'"


class SiLU(Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return inplace_apply(ops.silu, x) if self.inplace else ops.silu(x)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class ReLU(Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return ops.relu_(x) if self.inplace else ops.relu(x)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class Tanh(Module):
    def forward(self, x):
        return ops.tanh(x)


class Sigmoid(Module):
    def forward(self, x):
        return ops.sigmoid(x)


class Softmax(Module):
    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return ops.softmax(x, self.dim)


class Dropout(Module):
    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p
        self.inplace = inplace

    def forward(self, x):
        if self.inplace and self.training and self.p > 0:
            return inplace_apply(lambda t: ops.dropout(t, self.p, True), x)
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


def inplace_apply(fn, x):
    """x overwritten with fn(x), as torch's inplace=True flags do. When autograd tracks x, fn reads a
    copy (its backward may need the input, which the write replaces), as torch saves one."""
    out = fn(ops.clone(x) if x.requires_grad else x)
    if out is x:
        return x
    x.copy_(out)
    return x
