"""Run one script text twice: as written (real torch) and with `import torch`
resolving to cutegrad.

`run_script(text, argv, library)` execs the text as `__main__` with sys.argv
set; for "cutegrad" every `torch[.x.y]` module name in sys.modules points at
the matching `cutegrad[.x.y]` module for the duration (so `import torch.nn as
nn`, `from torch.utils.data import DataLoader`, `torch.amp.autocast` resolve
to cutegrad's objects), and the real torch modules are put back afterwards.
The script's globals are returned, so a test reads what it recorded (its
`losses` list, say).

For the torch run `torch.compile` is replaced by the identity: the reference
is torch's eager numerics (inductor needs a C++ toolchain and minutes on
this CPU, and its fusions reorder float math); cutegrad's `compile` on the
CPU runs the model eagerly too, so both sides compare eager arithmetic.
"""
import importlib
import sys

_ALIASED = ("nn", "nn.functional", "nn.init", "nn.utils", "optim", "optim.lr_scheduler", "utils", "utils.data",
            "amp", "cuda", "cuda.amp", "autograd", "backends", "distributed", "nn.parallel",
            "utils.data.distributed")


def _cutegrad_modules():
    import cutegrad
    mods = {"torch": cutegrad}
    for name in _ALIASED:
        try:
            mods["torch." + name] = importlib.import_module("cutegrad." + name)
        except ImportError:
            continue
    return mods


def run_script(text, argv, library, filename="train.py"):
    """exec text as __main__ under `library` ("torch" or "cutegrad"); the script's globals."""
    saved_argv = sys.argv
    namespace = {"__name__": "__main__", "__file__": filename}
    code = compile(text, filename, "exec")
    sys.argv = [filename] + list(argv)
    try:
        if library == "cutegrad":
            _exec_aliased(code, namespace)
        else:
            import torch
            real_compile = torch.compile
            torch.compile = lambda model=None, **kw: model if model is not None else (lambda m: m)
            try:
                exec(code, namespace)
            finally:
                torch.compile = real_compile
    finally:
        sys.argv = saved_argv
    return namespace


def _exec_aliased(code, namespace):
    # torch's own modules leave sys.modules only while the script runs; torch registers
    # operators at import, so they must come back as the same objects, never re-imported
    saved = {k: v for k, v in sys.modules.items() if k == "torch" or k.startswith("torch.")}
    for k in saved:
        del sys.modules[k]
    aliases = _cutegrad_modules()
    sys.modules.update(aliases)
    try:
        exec(code, namespace)
    finally:
        for k in [k for k in sys.modules if k == "torch" or k.startswith("torch.")]:
            del sys.modules[k]
        sys.modules.update(saved)
