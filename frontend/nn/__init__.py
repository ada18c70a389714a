"""cutegrad.nn: modules, functional ops and initialisers (torch.nn's API)."""
from .module import Module
from .parameter import Parameter, Buffer
from .linear import Linear, Identity
from .sparse import Embedding
from .normalization import LayerNorm, RMSNorm
from .activation import GELU, SiLU, ReLU, Tanh, Sigmoid, Softmax, Dropout
from .container import Sequential, ModuleList, ModuleDict
from . import functional, init, utils
from .fused_norms import AddLayerNorm, AddRMSNorm

__all__ = ["Module", "Parameter", "Buffer", "Linear", "Identity", "Embedding", "LayerNorm", "RMSNorm", "GELU",
           "SiLU", "ReLU", "Tanh", "Sigmoid", "Softmax", "Dropout", "Sequential", "ModuleList", "ModuleDict",
           "functional", "init", "utils", "AddLayerNorm", "AddRMSNorm"]
