"""The CUDA backend of the fused add+norm on the dry-run device (no GPU): which
`_C` entries a forward and backward call, with which dtype codes, row counts and
CTA counts, and the CUDA C++ fallback when the CuTeDSL table has no kernel."""
import pytest

import cutegrad as cg
from cutegrad import dtypes as dt

BF16, F32 = 1, 2  # kNormBF16, kNormF32 (kernels/cuda/norm_cute_args.h)


def _run(n, rows, x_dtype, res_dtype, rms, answer):
    with cg.cuda.dry_run() as dry:
        dry.kernels.returns("cute_norm", lambda *a: answer)
        dry.kernels.returns("cute_norm_backward", lambda *a: answer)
        dry.kernels.returns("cute_norm_finish", lambda *a: answer)
        x = cg.randn(rows, n, device="cuda", dtype=x_dtype).requires_grad_()
        res = cg.randn(rows, n, device="cuda", dtype=res_dtype).requires_grad_() if res_dtype else None
        w = cg.ones(n, device="cuda").requires_grad_()
        b = cg.zeros(n, device="cuda").requires_grad_()
        dry.reset()
        if rms:
            y, s = cg.add_rms_norm(x, res, w, out_dtype=dt.bfloat16)
        else:
            y, s = cg.add_layer_norm(x, res, w, b, out_dtype=dt.bfloat16)
        forward = list(dry.calls)
        dry.reset()
        cg.autograd.backward([y, s], [cg.ones_like(y), cg.ones_like(s)])
        grads = (x.grad, res.grad if res is not None else None, w.grad, None if rms else b.grad)
        # the engine's copies of the two seed gradients come first; the node's launches follow
        return forward, list(dry.calls[2:]), grads


@pytest.mark.parametrize("rms", [False, True])
def test_specialized_call_is_one_forward_and_two_backward_launches(rms):
    fwd, bwd, (dx, dres, dw, db) = _run(768, 1000, dt.bfloat16, dt.float32, rms, "norm_sm_90a_x")
    assert [c[0] for c in fwd] == ["cute_norm"]
    args = fwd[0][1]
    assert args[8:13] == (1000, 768, BF16, F32, BF16) and args[13] is rms
    assert [c[0] for c in bwd] == ["cute_norm_backward", "cute_norm_finish"]
    bargs = bwd[0][1]
    assert bargs[2] != 0, "the new residual's gradient is added in the kernel"
    assert bargs[12:17] == (1000, 768, F32, BF16, BF16)  # rows, n, s, dy, and ds again in x's bf16
    assert bargs[11] == -(-1000 // 4) and bwd[1][1][6] == bargs[11]  # one partial row per CTA of 4 row slots
    # dweight's (, dbias') and dx's partials: 16-byte aligned blocks of one allocation, read by the finish
    pw, pb, pc = bargs[8:11]
    block = 4 * 768 * bargs[11]
    assert pc - pw == (block if rms else 2 * block) and pc % 16 == 0 and pb == (0 if rms else pw + block)
    assert bwd[1][1][:3] == bargs[8:11]
    assert dx.dtype is dt.bfloat16 and dres.dtype is dt.float32 and dw.dtype is dt.float32
    assert (db is None) == rms


def test_without_residual_the_gradient_of_x_is_ds():
    fwd, bwd, (dx, _, _, _) = _run(256, 64, dt.float32, None, False, "norm_sm_90a_x")
    assert fwd[0][1][1] == 0 and fwd[0][1][2] == 0 and fwd[0][1][10:12] == (F32, 0)
    assert bwd[0][1][4] == 0 and bwd[0][1][16] == 0  # no second ds output
    assert dx.dtype is dt.float32


def test_no_specialization_falls_back_to_add_norm_and_cast():
    fwd, bwd, (dx, dres, dw, db) = _run(100, 10, dt.bfloat16, dt.float32, False, "")
    names = [c[0] for c in fwd]
    assert names[0] == "cute_norm" and "norm" in names and names.count("elementwise") == 2  # add, cast to bf16
    bnames = [c[0] for c in bwd]
    assert bnames[0] == "cute_norm_backward" and "norm_backward" in bnames and "cute_norm_finish" not in bnames
    assert dx.dtype is dt.bfloat16 and dres.dtype is dt.float32 and dw is not None and db is not None


@pytest.mark.parametrize("rms", [False, True])
def test_plain_norms_take_the_cute_kernels_when_they_fit(rms):
    with cg.cuda.dry_run() as dry:
        dry.kernels.returns("cute_norm", lambda *a: "k" if a[9] == 256 else "")  # the table has n = 256, not 100
        dry.kernels.returns("cute_norm_backward", lambda *a: "k")
        dry.kernels.returns("cute_norm_finish", lambda *a: "k")
        norm = (cg.nn.RMSNorm(256) if rms else cg.nn.LayerNorm(256)).to("cuda")
        x = cg.randn(4, 32, 256, device="cuda").requires_grad_()
        dry.reset()
        y = norm(x)
        assert [c[0] for c in dry.calls] == ["cute_norm"]
        assert dry.calls[0][1][8:13] == (128, 256, F32, 0, F32)
        dry.reset()
        y.backward(cg.ones_like(y))
        assert [c[0] for c in dry.calls[1:]] == ["cute_norm_backward", "cute_norm_finish"]
        assert x.grad.dtype is dt.float32 and norm.weight.grad is not None
        odd = (cg.nn.RMSNorm(100) if rms else cg.nn.LayerNorm(100)).to("cuda")
        x = cg.randn(4, 100, device="cuda")
        dry.reset()
        odd(x)
        assert [c[0] for c in dry.calls] == ["cute_norm", "norm"]  # nothing launched by the first: no n = 100


@pytest.mark.parametrize("mlp", [False, True])
def test_linear_bias_gradient_is_the_norm_finish_output(mlp):
    """A Linear (or the fused MLP's fc2) feeding the add+norm launches no column sum: its bias
    gradient is the dx column sum the norm's finish kernel writes."""
    import cutegrad.nn.functional as F
    with cg.cuda.dry_run() as dry:
        for name in ("cute_norm", "cute_norm_backward", "cute_norm_finish"):
            dry.kernels.returns(name, lambda *a: "k")
        h = cg.randn(64, 128, device="cuda").requires_grad_()
        res = cg.randn(64, 256, device="cuda").requires_grad_()
        w1, b1 = cg.randn(256, 128, device="cuda").requires_grad_(), cg.zeros(256, device="cuda").requires_grad_()
        w2, b2 = cg.randn(256, 256, device="cuda").requires_grad_(), cg.zeros(256, device="cuda").requires_grad_()
        nw, nb = cg.ones(256, device="cuda").requires_grad_(), cg.zeros(256, device="cuda").requires_grad_()
        x = F.mlp_gelu(h, w1, b1, w2, b2) if mlp else F.linear(h, w1, b1)
        y, s = cg.add_layer_norm(x, res, nw, nb)
        seeds = [cg.ones_like(y), cg.ones_like(s)]
        dry.reset()
        cg.autograd.backward([y, s], seeds)
        names = [c[0] for c in dry.calls]
        finish = [c for c in dry.calls if c[0] == "cute_norm_finish"]
        assert len(finish) == 1
        bias = b2 if mlp else b1
        assert bias.grad.data_ptr() == finish[0][1][5]
        # only fc1's bias gradient (behind the GELU backward) is reduced by a kernel of its own
        assert names.count("column_sum") == (1 if mlp else 0)


def test_linear_output_used_twice_gets_its_own_column_sum():
    import cutegrad.nn.functional as F
    with cg.cuda.dry_run() as dry:
        for name in ("cute_norm", "cute_norm_backward", "cute_norm_finish"):
            dry.kernels.returns(name, lambda *a: "k")
        h = cg.randn(64, 128, device="cuda").requires_grad_()
        lw, lb = cg.randn(256, 128, device="cuda").requires_grad_(), cg.zeros(256, device="cuda").requires_grad_()
        x = F.linear(h, lw, lb)
        y, s = cg.add_layer_norm(x, None, cg.ones(256, device="cuda"), cg.zeros(256, device="cuda"))
        seeds = [cg.ones_like(y), cg.ones_like(x)]
        dry.reset()
        cg.autograd.backward([y, x], seeds)
        assert [c[0] for c in dry.calls].count("column_sum") == 1
