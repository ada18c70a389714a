"""Load kernels/cute/norms.py or kernels/reference/norms.py by path (both are named
"norms", so a plain import of one would shadow the other)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_norms_module(folder):
    path = os.path.join(ROOT, "kernels", folder, "norms.py")
    spec = importlib.util.spec_from_file_location(f"cutegrad_kernels_{folder}_norms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
