"""`cutegrad.backends.cudnn`: PyTorch's cuDNN switches, accepted so scripts that set them run.

cutegrad has no cuDNN behind it (its convolution-free kernels are its own), so these flags
change nothing: `allow_tf32`, `benchmark`, `deterministic` and `enabled` are plain attributes
with PyTorch's defaults, and `is_available()` says False.
"""

allow_tf32 = True
benchmark = False
deterministic = False
enabled = True


def is_available():
    """False: cutegrad does not use cuDNN."""
    return False


def version():
    """None: no cuDNN library is loaded."""
    return None
