"""Philox4x32-10 for the CuTeDSL kernels that regenerate dropout masks (attention_fwd,
attention_bwd, norms): the generator of kernels/cuda/philox.h, so a mask drawn by a CUDA C++
kernel and one regenerated here are the same bits.

Not a kernel family (no specializations): kernels/cute/aot.py hashes it into the cache key of
every family that imports it.  cutlass is imported where the rounds are traced, never at
module import: a compile worker sets CUTE_DSL_ARCH before its first cutlass import.
"""

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(k0, k1, counter):
    """The four 32-bit words of Philox4x32-10 with key (k0, k1) (Uint32) and counter
    (counter's low and high words, 0, 0), counter an Int64.  Traced as plain Python: the ten
    rounds unroll where a kernel calls it."""
    import cutlass
    import cutlass.cute as cute

    u32 = cutlass.Uint32
    c0, c1, c2, c3 = u32(counter), u32(counter >> 32), u32(0), u32(0)
    for _ in range(10):
        hi0 = cute.arch.mul_hi(c0, u32(MULTIPLIERS[0]))
        lo0 = c0 * u32(MULTIPLIERS[0])
        hi1 = cute.arch.mul_hi(c2, u32(MULTIPLIERS[1]))
        lo1 = c2 * u32(MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + u32(KEY_STEPS[0])
        k1 = k1 + u32(KEY_STEPS[1])
    return c0, c1, c2, c3
