"""The CUDA backend: every compute kernel of the registry on CUDA tensors.

One module per kernel family, mirroring kernels/cuda/ and frontend/ops/: launch.py
(what every family shares: stream, output allocation, pointers), copies, pointwise,
reduction, linalg, softmax, norms, indexing, random, sorting, optim, cross_entropy.

Storage kernels (empty, full, from_numpy, to_device) come from
`cutegrad.cuda.tensors`, imported here; this module registers everything
else with the same names, signatures and semantics as the CPU backend (the
spec: half types compute in fp32 and round once) and overrides `copy_` for
device-to-device copies so casts, broadcasts and strided destinations run
on the GPU instead of through the host.

Index kernels (gather, index_select, scatter_add, index_add, one_hot) get
the device's error record (cutegrad.cuda.index_errors): an out-of-range
index is skipped on the device and raised as IndexError at the host's next
wait for the device, so no index tensor is read back before a launch.

Each kernel allocates its output from the caching allocator on the device's
current stream and calls one `cutegrad._C` entry point with raw pointers,
shapes and strides (kernels/cuda/ops_bindings.cpp validates them and launches
on that stream). Nothing here synchronises, except what needs values on the
host: advanced indexing keys (index/index_put_, whose element offsets are
computed and bounds-checked on the host), and randperm.

Importing this module touches neither the driver nor `cutegrad._C`; both are
reached on the first CUDA op. The design of the kernels is in docs/cuda_ops.md.
"""
from ...cuda import tensors as _cuda_tensors  # noqa: F401  (registers empty/full/from_numpy/to_device first)
from . import copies, pointwise, reduction, linalg, softmax, norms, indexing, random, sorting, optim, cross_entropy  # noqa: F401  (each registers its kernels)
from . import attention_backward  # noqa: F401  (registers sdpa_flash_backward)
from .launch import set_poison_outputs
from .softmax import softmax_causal, softmax_backward
from .norms import layer_norm_backward, rms_norm_backward
from .cross_entropy import cross_entropy_rows, cross_entropy_rows_backward
from ..precision import cuda_matmul as matmul  # cutegrad.backends.cuda.matmul.allow_tf32, as in torch
from .optim import adamw_multi_tensor, sgd_multi_tensor, multi_tensor_scale, grad_norm_clip
from . import attention  # noqa: F401  (registers sdpa_flash and the fused-attention device check)
from . import dropout  # noqa: F401  (registers dropout_fused and its backward)
from . import column_sum  # noqa: F401  (registers column_sum, the one-launch bias gradient)

__all__ = ["set_poison_outputs", "softmax_causal", "softmax_backward", "layer_norm_backward", "rms_norm_backward",
           "cross_entropy_rows", "cross_entropy_rows_backward", "adamw_multi_tensor", "sgd_multi_tensor",
           "multi_tensor_scale", "grad_norm_clip"]
