"""The skip reason of GPU tests that need one `cutegrad._C` entry on a CUDA device."""


def skip_reason(entry):
    """None when a CUDA GPU is present and cutegrad._C has `entry`, else why not."""
    try:
        import cutegrad.cuda as cuda
        if not cuda.is_available():
            return "needs a CUDA GPU and driver"
        from cutegrad import _C
        if not hasattr(_C, entry):
            return f"cutegrad._C was built without {entry}"
    except Exception as exc:  # no driver library, or the extension is not built
        return f"needs a CUDA GPU and cutegrad._C: {type(exc).__name__}: {exc}"
    return None
