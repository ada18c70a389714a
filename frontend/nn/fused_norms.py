"""AddLayerNorm and AddRMSNorm: LayerNorm / RMSNorm modules that also take the
residual stream and return (normed, x + residual) from one fused op
(ops.add_layer_norm / ops.add_rms_norm).  Their parameters have LayerNorm's
and RMSNorm's names and shapes, so a state_dict moves between the fused and
the plain modules unchanged.

dropout = p: in training, when a residual is given, x is the output of a
residual branch whose dropout the module applies in the same op: the new
residual is residual + dropout(x, p) (the mask ops.dropout would draw)."""
from .. import ops
from .normalization import LayerNorm, RMSNorm


class AddLayerNorm(LayerNorm):
    """forward(x, residual=None, out_dtype=None) -> (layer_norm(s), s), s = residual + dropout(x)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 dropout=0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"AddLayerNorm normalizes the last dimension only, got {list(self.normalized_shape)}")
        self.dropout = dropout

    def forward(self, x, residual=None, out_dtype=None):
        p = self.dropout if self.training and residual is not None else 0.0
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, out_dtype, p)


class AddRMSNorm(RMSNorm):
    """forward(x, residual=None, out_dtype=None) -> (rms_norm(s), s), s = residual + dropout(x)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, dropout=0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"AddRMSNorm normalizes the last dimension only, got {list(self.normalized_shape)}")
        self.dropout = dropout

    def forward(self, x, residual=None, out_dtype=None):
        p = self.dropout if self.training and residual is not None else 0.0
        return ops.add_rms_norm(x, residual, self.weight, self.eps, out_dtype, p)
