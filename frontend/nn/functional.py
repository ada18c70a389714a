"""torch.nn.functional's names over cutegrad ops."""
from ..ops import (linear, relu, gelu, silu, sigmoid, tanh, softmax, log_softmax, cross_entropy, nll_loss, mse_loss,
                   layer_norm, rms_norm, embedding, scaled_dot_product_attention, one_hot)
from .. import ops
from ..ops.linalg import linear_gelu, linear_residual, mlp_gelu  # fused: one GEMM epilogue, one autograd node
from ..ops import add_layer_norm, add_rms_norm


def dropout(input, p=0.5, training=True, inplace=False):
    if inplace and training and p > 0:
        return inplace_apply(lambda t: ops.dropout(t, p, True), input)
    return ops.dropout(input, p, training)


def relu_(input):
    return input.relu_()


__all__ = ["linear", "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "softmax", "log_softmax", "cross_entropy",
           "nll_loss", "mse_loss", "layer_norm", "rms_norm", "embedding", "dropout", "scaled_dot_product_attention",
           "one_hot", "linear_gelu", "linear_residual", "mlp_gelu", "add_layer_norm",
           "add_rms_norm"]

# torch.nn.functional names of the conv, pooling, padding, normalization and loss families, and the
# inplace flags of relu/silu.
from ..ops.conv import conv2d, unfold, fold  # noqa: E402
from ..ops.pooling import max_pool2d, avg_pool2d, adaptive_avg_pool2d  # noqa: E402
from ..ops.padding import pad  # noqa: E402
from ..ops.normalization import batch_norm, normalize  # noqa: E402
from ..ops.loss import l1_loss, binary_cross_entropy, binary_cross_entropy_with_logits  # noqa: E402
from .activation import inplace_apply  # noqa: E402


def relu(input, inplace=False):  # noqa: F811  (adds torch's inplace flag to ops.relu)
    return ops.relu_(input) if inplace else ops.relu(input)


def silu(input, inplace=False):  # noqa: F811
    return inplace_apply(ops.silu, input) if inplace else ops.silu(input)


__all__ += ["conv2d", "unfold", "fold", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "pad", "batch_norm",
            "normalize", "l1_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits"]

from ..ops.attention import qkv_attention  # noqa: E402  (fused: q, k, v packed in one projection output)

__all__ += ["qkv_attention"]
