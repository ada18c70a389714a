"""cutegrad.nn: modules, functional ops and initialisers (torch.nn's API)."""
from .module import Module
from .parameter import Parameter, Buffer
from .linear import Linear, Identity
from .sparse import Embedding
from .normalization import LayerNorm, RMSNorm
from .activation import GELU, SiLU, ReLU, Tanh, Sigmoid, Softmax, Dropout
from .container import Sequential, ModuleList, ModuleDict
from . import functional, init, utils
from .conv import Conv2d
from .pooling import MaxPool2d, AvgPool2d, AdaptiveAvgPool2d
from .batchnorm import BatchNorm1d, BatchNorm2d
from .attention import MultiheadAttention
from .flatten import Flatten, Unflatten
from .loss import CrossEntropyLoss, MSELoss, L1Loss, NLLLoss, BCELoss, BCEWithLogitsLoss
from .fused_norms import AddLayerNorm, AddRMSNorm
from . import parallel

__all__ = ["Module", "Parameter", "Buffer", "Linear", "Identity", "Embedding", "LayerNorm", "RMSNorm", "GELU",
           "SiLU", "ReLU", "Tanh", "Sigmoid", "Softmax", "Dropout", "Sequential", "ModuleList", "ModuleDict",
           "functional", "init", "utils", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm1d",
           "BatchNorm2d", "MultiheadAttention", "Flatten", "Unflatten", "CrossEntropyLoss", "MSELoss", "L1Loss",
           "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "parallel", "AddLayerNorm", "AddRMSNorm"]
