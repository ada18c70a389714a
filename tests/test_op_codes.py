"""The kernel op codes have one source, frontend/ops/codes.py: the build generates
kernels/cuda/op_codes.h from it, and the CUDA sources take their codes from that header."""
import os
import re
import subprocess
import sys

from cutegrad.ops import codes as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "kernels", "cuda")


def _enums(text):
    """{enum name: {member: value}} of `enum Name : int { A = 1, B = 2 };` lines."""
    out = {}
    for name, body in re.findall(r"enum (\w+) : int \{([^}]*)\}", text):
        out[name] = {m: int(v) for m, v in re.findall(r"(\w+) = (-?\d+)", body)}
    return out


def test_header_holds_every_code_with_its_python_value():
    enums = _enums(C.c_header())
    for enum, names in C._ELEMENTWISE.items():
        assert enums[enum] == {n: getattr(C, n) for n in names}
    assert enums["ReduceCode"] == {c: getattr(C, n) for c, n in C._REDUCE}
    assert enums["ReduceCode"]["kLogSumExp"] == C.LOGSUMEXP == 301


def test_codes_are_distinct_and_grouped():
    unary = [getattr(C, n) for n in C._ELEMENTWISE["UnaryCode"]]
    binary = [getattr(C, n) for n in C._ELEMENTWISE["BinaryCode"]]
    assert unary == list(range(len(unary))) and binary == list(range(100, 100 + len(binary)))
    assert len(set(unary + binary + [getattr(C, n) for _, n in C._REDUCE])) == len(unary) + len(binary) + len(C._REDUCE)


def test_script_writes_the_header_without_importing_cutegrad(tmp_path):
    out = tmp_path / "op_codes.h"
    code = ("import runpy, sys; sys.argv = ['codes.py', %r]; runpy.run_path(%r, run_name='__main__'); "
            "print('cutegrad' in sys.modules)") % (str(out), os.path.join(ROOT, "frontend", "ops", "codes.py"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
    assert out.read_text() == C.c_header()


def test_cuda_sources_define_no_codes_of_their_own():
    for name in ("elementwise.cu", "ops_args.h", "ops_bindings.cpp", "reduce.cu"):
        with open(os.path.join(CUDA_SRC, name)) as f:
            text = f.read()
        assert not set(_enums(text)) & {"UnaryCode", "BinaryCode", "ReduceCode"}, name
    with open(os.path.join(CUDA_SRC, "ops_args.h")) as f:
        assert '#include "op_codes.h"' in f.read()


def test_generated_header_matches_when_built():
    path = os.path.join(CUDA_SRC, "op_codes.h")
    if not os.path.exists(path):  # a tree that was never built: the build writes it
        import pytest
        pytest.skip("kernels/cuda/op_codes.h is written by the build (setup.py build_ext)")
    with open(path) as f:
        assert f.read() == C.c_header()
