"""What `_C.cute_norm*` would answer on an sm_90 build, for the dry-run device.

The dry run records `_C` calls without running them and answers None, which the
norm backend reads as "no CuTeDSL kernel fits" and follows with the CUDA C++
fallback: launch counts and host costs would then include both paths.  The
benchmarks that use the dry run (bench.launches, bench.overhead) answer with
the table the build compiles from kernels/cute/norms.py instead.
"""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cute_norm_family():
    path = os.path.join(ROOT, "kernels", "cute", "norms.py")
    spec = importlib.util.spec_from_file_location("cutegrad_kernels_cute_norms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NormTable:
    """The CuTeDSL norm kernels an sm_90 build has: what `_C.cute_norm*` would answer.

    Answers are remembered per key: the real entry looks its table up in C++, so
    building a spec and its name on every call would bill the benchmark's own
    stand-in to the norm's host cost."""

    def __init__(self):
        family = _cute_norm_family()
        self.spec = family.NormSpec
        self.names = {s.name for s in family.specializations(("sm_90a",))}
        self._answers = {}

    def forward(self, *a):
        key = ("fwd", a[13], a[9], a[10], a[11], a[12])
        name = self._answers.get(key)
        if name is None:
            rms, n, x, res, y = key[1:]
            name = self.spec("fwd", "rms" if rms else "layer", n, NORM_DTYPE[x], NORM_DTYPE[res], NORM_DTYPE[y]).name
            name = self._answers[key] = name if name in self.names else ""
        return name

    def backward(self, *a):
        key = ("bwd", a[17], a[13], a[14], a[15], a[16], bool(a[2]))
        name = self._answers.get(key)
        if name is None:
            rms, n, s, dy, dx2, dres = key[1:]
            name = self.spec("bwd", "rms" if rms else "layer", n, NORM_DTYPE[s], NORM_DTYPE[dx2], NORM_DTYPE[dy],
                             dres).name
            name = self._answers[key] = name if name in self.names else ""
        return name


NORM_DTYPE = {0: "", 1: "bf16", 2: "fp32"}
_norm_table = None


def norm_table():
    global _norm_table
    if _norm_table is None:
        _norm_table = _NormTable()
    return _norm_table


def answer_as_sm90(dry):
    """Make the dry run's cute_norm* entries answer as the built table would on sm_90."""
    table = norm_table()
    dry.kernels.returns("cute_norm", table.forward)
    dry.kernels.returns("cute_norm_backward", table.backward)
    dry.kernels.returns("cute_norm_finish", lambda *a: "norm_finish")
