"""Integer codes naming the variants of the unary/binary/reduce kernels.

Kernels receive these instead of strings so a backend switches on an int.
This module is the one source of the codes for Python and C++ alike: the
build writes them into kernels/cuda/op_codes.h (`python frontend/ops/codes.py
OUT.h`, run by setup.py before nvcc), which elementwise.cu and ops_args.h
include, so the two sides cannot disagree. It imports nothing, so the build
runs it without importing cutegrad.
"""
(NEG, EXP, LOG, SQRT, RSQRT, ABS, TANH, SIGMOID, RELU, GELU, GELU_TANH, SILU,
 SIGN, SIN, COS, LOGICAL_NOT, RECIPROCAL, SQUARE, ERF, LOG1P, EXPM1, FLOOR,
 CEIL, ROUND, TRUNC, ISNAN, ISINF, ISFINITE) = range(28)

(ADD, SUB, MUL, DIV, POW, MAXIMUM, MINIMUM, EQ, NE, LT, LE, GT, GE, AND, OR,
 XOR, FLOORDIV, REMAINDER, ATAN2) = range(100, 119)

SUM, MEAN, MAX, MIN, PROD, ANY, ALL, ARGMAX, ARGMIN = range(200, 209)
VAR, LOGSUMEXP = 300, 301  # the reduce kernel's two statistics (var, logsumexp kernels)

# C++ enums of kernels/cuda/op_codes.h: (enum, [(C++ name, Python name)]). Unary and binary codes
# keep their Python names inside namespace cutegrad::ops::codes (elementwise.cu uses them);
# reduce codes are cutegrad::ops's kSum, kMean, ... (ops_args.h and reduce.cu use them).
_ELEMENTWISE = {
    "UnaryCode": ("NEG", "EXP", "LOG", "SQRT", "RSQRT", "ABS", "TANH", "SIGMOID", "RELU", "GELU", "GELU_TANH", "SILU",
                  "SIGN", "SIN", "COS", "LOGICAL_NOT", "RECIPROCAL", "SQUARE", "ERF", "LOG1P", "EXPM1", "FLOOR",
                  "CEIL", "ROUND", "TRUNC", "ISNAN", "ISINF", "ISFINITE"),
    "BinaryCode": ("ADD", "SUB", "MUL", "DIV", "POW", "MAXIMUM", "MINIMUM", "EQ", "NE", "LT", "LE", "GT", "GE", "AND",
                   "OR", "XOR", "FLOORDIV", "REMAINDER", "ATAN2"),
}
_REDUCE = (("kSum", "SUM"), ("kMean", "MEAN"), ("kMax", "MAX"), ("kMin", "MIN"), ("kProd", "PROD"), ("kAny", "ANY"),
           ("kAll", "ALL"), ("kArgMax", "ARGMAX"), ("kArgMin", "ARGMIN"), ("kVar", "VAR"),
           ("kLogSumExp", "LOGSUMEXP"))


def c_header():
    """kernels/cuda/op_codes.h: the codes as C++ enums (see _ELEMENTWISE and _REDUCE)."""
    values = globals()
    reduce_body = ", ".join(f"{c} = {values[n]}" for c, n in _REDUCE)
    lines = ["// Generated from frontend/ops/codes.py at build time: edit that file, not this one.",
             "#pragma once", "", "namespace cutegrad {", "namespace ops {", "",
             f"enum ReduceCode : int {{ {reduce_body} }};", "", "namespace codes {"]
    for enum, names in _ELEMENTWISE.items():
        lines.append(f"enum {enum} : int {{ " + ", ".join(f"{n} = {values[n]}" for n in names) + " };")
    lines += ["}  // namespace codes", "", "}  // namespace ops", "}  // namespace cutegrad", ""]
    return "\n".join(lines)


def write_c_header(path):
    """Write c_header() to `path` unless it already holds it (an unchanged header keeps nvcc's cache)."""
    text = c_header()
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    import sys
    write_c_header(sys.argv[1])
