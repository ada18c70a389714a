"""torch.nn.functional's names over cutegrad ops."""
from ..ops import (linear, relu, gelu, silu, sigmoid, tanh, softmax, log_softmax, cross_entropy, nll_loss, mse_loss,
                   layer_norm, rms_norm, embedding, scaled_dot_product_attention, one_hot)
from .. import ops
from ..ops import add_layer_norm, add_rms_norm


def dropout(input, p=0.5, training=True, inplace=False):
    out = ops.dropout(input, p, training)
    if inplace and out is not input:
        input.copy_(out)
        return input
    return out


def relu_(input):
    return input.relu_()


__all__ = ["linear", "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "softmax", "log_softmax", "cross_entropy",
           "nll_loss", "mse_loss", "layer_norm", "rms_norm", "embedding", "dropout", "scaled_dot_product_attention",
           "one_hot", "add_layer_norm", "add_rms_norm"]
