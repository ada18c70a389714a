"""Integer codes naming the variants of the unary/binary/reduce kernels.

Kernels receive these instead of strings so a backend switches on an int.
"""
(NEG, EXP, LOG, SQRT, RSQRT, ABS, TANH, SIGMOID, RELU, GELU, GELU_TANH, SILU,
 SIGN, SIN, COS, LOGICAL_NOT, RECIPROCAL, SQUARE, ERF, LOG1P, EXPM1, FLOOR,
 CEIL, ROUND, TRUNC, ISNAN, ISINF, ISFINITE) = range(28)

(ADD, SUB, MUL, DIV, POW, MAXIMUM, MINIMUM, EQ, NE, LT, LE, GT, GE, AND, OR,
 XOR, FLOORDIV, REMAINDER, ATAN2) = range(100, 119)

SUM, MEAN, MAX, MIN, PROD, ANY, ALL, ARGMAX, ARGMIN = range(200, 209)
