"""Reverse-mode automatic differentiation (see engine.py for the design)."""
from .grad_mode import no_grad, enable_grad, set_grad_enabled, inference_mode, is_grad_enabled
from .engine import backward, grad, Node
from .function import Function, FunctionCtx
from .gradcheck import gradcheck, gradgradcheck

__all__ = ["no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "is_grad_enabled", "backward", "grad",
           "Node", "Function", "FunctionCtx", "gradcheck", "gradgradcheck"]
