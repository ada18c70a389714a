"""cutegrad: a compact PyTorch-style eager framework.

Tensors, autograd, nn and optim with a NumPy CPU backend (also the float64
reference) and CUDA kernels compiled ahead of time (cutegrad._C).
"""
__version__ = "0.1.0"

from .dtypes import (bool_ as bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32, float64,
                     float16 as half, float32 as float, float64 as double, int64 as long, int32 as int,
                     int16 as short, DType as dtype, get_default_dtype, set_default_dtype, promote_types,
                     result_type)
from .device import device
from .tensor import Tensor, Size
from . import dispatch
from . import autograd
from .autograd import no_grad, enable_grad, set_grad_enabled, inference_mode, is_grad_enabled
from .random import manual_seed, seed, initial_seed, Generator
from . import ops
from .ops import *  # noqa: F401,F403  (the op namespace is the public API, as in torch)
from .ops import sum, max, min, abs, all, any, pow, round  # names shadowing builtins, explicitly
from .autocast import autocast, is_autocast_enabled, get_autocast_dtype, set_autocast_dtype, clear_autocast_cache
from .backends import cpu as _cpu_backend  # registers the CPU kernels
from . import cuda  # CUDA runtime and CUDA tensor storage; imports no driver until first use
from .backends import cuda as _cuda_backend  # registers the CUDA kernels; touches neither the driver nor _C
from . import tensor_methods as _tensor_methods  # binds Tensor methods
from . import nn, optim, data
from .graphs import rng as _graph_rng  # makes manual_seed reach the CUDA generators
from .io import save, load, from_dlpack
from . import amp
from .compile import compile
from . import utils
from .backends.precision import set_float32_matmul_precision, get_float32_matmul_precision
from .backends import cudnn as _cudnn  # cutegrad.backends.cudnn: PyTorch's flags, no cuDNN behind them

del _cpu_backend, _tensor_methods, _graph_rng, _cudnn
