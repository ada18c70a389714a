"""Bad input to the core raises a clear error naming the problem, before any
kernel runs: nothing is half-written, and the process stays usable."""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad.tensor import Storage, make, contiguous_strides


class _FakeDeviceMemory:
    """Stands in for device memory: only the device check may look at it."""
    ptr = 0x1000


def on_fake_cuda(shape, dtype=cg.float32):
    """A tensor that claims to live on cuda:0; any kernel touching it would fail."""
    return make(Storage(_FakeDeviceMemory(), cg.device("cuda:0")), tuple(shape), contiguous_strides(shape), 0, dtype)


def _leaf(*shape):
    return cg.ones(*shape, dtype=cg.float64, requires_grad=True)


def _second_backward():
    y = (_leaf(2).exp()).sum()
    y.backward()
    y.backward()


def _saved_modified():
    x = _leaf(3)
    h = x * 2
    y = h.sigmoid()
    y.mul_(2)
    y.sum().backward()


def _setitem_oob():
    t = cg.zeros(3)
    t[cg.tensor([0, 3])] = 1.0


CATALOGUE = [
    # broadcast mismatch
    ("broadcast_add", lambda: cg.zeros(2, 3) + cg.zeros(4, 3), RuntimeError, r"\[2, 3\] and \[4, 3\] cannot be broadcast"),
    ("broadcast_where", lambda: cg.where(cg.zeros(3, dtype=cg.bool), cg.zeros(2), 0.0), RuntimeError,
     "cannot be broadcast"),
    ("broadcast_mse", lambda: cg.mse_loss(cg.zeros(3), cg.zeros(4)), RuntimeError, "cannot be broadcast"),
    ("broadcast_inplace", lambda: cg.zeros(3).add_(cg.zeros(2, 3)), RuntimeError,
     r"output with shape \[3\] doesn't match the broadcast shape \[2, 3\]"),
    ("broadcast_masked_fill_", lambda: cg.zeros(3).masked_fill_(cg.zeros(2, 3, dtype=cg.bool), 1.0), RuntimeError,
     "doesn't match the broadcast shape"),
    # matmul inner dimension
    ("matmul_inner", lambda: cg.zeros(2, 3) @ cg.zeros(4, 5), RuntimeError, r"cannot be multiplied \(2x3 and 4x5\)"),
    ("matmul_batched_inner", lambda: cg.zeros(7, 2, 3) @ cg.zeros(7, 4, 5), RuntimeError, "cannot be multiplied"),
    ("matmul_batch_broadcast", lambda: cg.zeros(2, 2, 3) @ cg.zeros(3, 3, 5), RuntimeError, "cannot be broadcast"),
    ("matmul_vectors", lambda: cg.zeros(3) @ cg.zeros(4), RuntimeError, "inconsistent tensor size"),
    ("mm_inner", lambda: cg.mm(cg.zeros(2, 3), cg.zeros(2, 3)), RuntimeError, "cannot be multiplied"),
    ("bmm_inner", lambda: cg.bmm(cg.zeros(2, 2, 3), cg.zeros(2, 4, 3)), RuntimeError, "cannot be multiplied"),
    ("linear_in_features", lambda: cg.linear(cg.zeros(2, 3), cg.zeros(4, 5)), RuntimeError,
     "does not match weight's in_features 5"),
    # dtype not supported by the op
    ("matmul_int", lambda: cg.zeros(2, 2, dtype=cg.int64) @ cg.zeros(2, 2, dtype=cg.int64), RuntimeError,
     "not implemented for 'cutegrad.int64'"),
    ("matmul_mixed", lambda: cg.zeros(2, 2) @ cg.zeros(2, 2, dtype=cg.float64), RuntimeError, "same dtype"),
    ("softmax_int", lambda: cg.softmax(cg.tensor([1, 2]), 0), RuntimeError, "floating point input, got cutegrad.int64"),
    ("layer_norm_int", lambda: cg.layer_norm(cg.tensor([[1, 2]]), (2,)), RuntimeError, "floating point"),
    ("var_int", lambda: cg.var(cg.tensor([1, 2])), RuntimeError, "floating point"),
    ("mean_int", lambda: cg.tensor([1, 2]).mean(), RuntimeError, "Got: cutegrad.int64"),
    ("requires_grad_int", lambda: cg.tensor([1]).requires_grad_(), RuntimeError, "floating point dtype"),
    ("bitwise_float", lambda: cg.zeros(2) & cg.zeros(2), TypeError, "bool tensors only"),
    ("invert_float", lambda: ~cg.zeros(2), TypeError, "bool tensors only"),
    ("bool_sub", lambda: cg.tensor([True]) - cg.tensor([True]), RuntimeError, "Subtraction.*bool"),
    ("one_hot_float", lambda: cg.one_hot(cg.zeros(2), 3), RuntimeError, "LongTensor"),
    ("embedding_float_idx", lambda: cg.embedding(cg.zeros(2), cg.zeros(3, 2)), RuntimeError, "indices"),
    ("gather_float_index", lambda: cg.gather(cg.zeros(2), 0, cg.zeros(2)), RuntimeError, "int64 or int32 for index"),
    ("index_float_tensor", lambda: cg.zeros(3)[cg.tensor([0.0])], IndexError, "must be long, int, byte or bool"),
    ("where_int_condition", lambda: cg.where(cg.tensor([1, 0]), 1.0, 0.0), RuntimeError, "boolean tensor"),
    ("masked_fill_int_mask", lambda: cg.zeros(2).masked_fill(cg.tensor([1, 0]), 0.0), RuntimeError, "boolean masks"),
    ("inplace_float_into_int", lambda: cg.tensor([1, 2]).mul_(0.5), RuntimeError,
     "result type cutegrad.float32 can't be cast"),
    ("unknown_dtype_name", lambda: cg.tensor([1.0], dtype="float8"), TypeError, "unknown dtype 'float8'"),
    # mixing devices: caught by the device comparison, before any kernel
    ("devices_add", lambda: cg.zeros(3) + on_fake_cuda((3,)), RuntimeError,
     "Expected all tensors to be on the same device.*cpu and cuda:0"),
    ("devices_mul_reversed", lambda: on_fake_cuda((3,)) * cg.zeros(3), RuntimeError, "same device"),
    ("devices_matmul", lambda: cg.zeros(2, 2) @ on_fake_cuda((2, 2)), RuntimeError, "same device"),
    ("devices_cat", lambda: cg.cat([cg.zeros(2), on_fake_cuda((2,))]), RuntimeError, "same device"),
    ("devices_where", lambda: cg.where(cg.zeros(2, dtype=cg.bool), on_fake_cuda((2,)), 0.0), RuntimeError,
     "same device"),
    # autograd misuse
    ("backward_non_scalar", lambda: (_leaf(3) * 2).backward(), RuntimeError,
     r"grad can be implicitly created only for scalar outputs.*shape \[3\]"),
    ("backward_no_grad", lambda: cg.zeros(2).sum().backward(), RuntimeError, "does not require grad"),
    ("second_backward", _second_backward, RuntimeError, "retain_graph=True"),
    ("inplace_leaf", lambda: _leaf(2).add_(1), RuntimeError, "leaf Variable that requires grad"),
    ("inplace_leaf_setitem", lambda: _leaf(2).__setitem__(0, 1.0), RuntimeError, "leaf Variable that requires grad"),
    ("saved_modified", _saved_modified, RuntimeError,
     "modified by an inplace operation.*version 1; expected version 0"),
    ("grad_unused_input", lambda: cg.autograd.grad((_leaf(1) * 2).sum(), _leaf(1)), RuntimeError,
     "not have been used in the graph"),
    ("inplace_into_expanded", lambda: cg.zeros(3, 1).expand(3, 4).add_(1.0), RuntimeError,
     "more than one element of the written-to tensor refers to a single memory location"),
    ("setitem_into_expanded", lambda: cg.zeros(1).expand(3).__setitem__(cg.tensor([0]), 1.0), RuntimeError,
     "single memory location"),
    # out-of-range indices
    ("getitem_int", lambda: cg.zeros(2, 3)[:, 3], IndexError, "index 3 is out of bounds for dimension 1 with size 3"),
    ("getitem_negative", lambda: cg.zeros(2, 3)[-3], IndexError, "index -3 is out of bounds"),
    ("getitem_tensor", lambda: cg.zeros(4)[cg.tensor([1, 4])], IndexError, "index 4 is out of bounds"),
    ("getitem_too_many", lambda: cg.zeros(2)[0, 0], IndexError, "too many indices"),
    ("getitem_mask_shape", lambda: cg.zeros(3)[cg.tensor([True, False])], IndexError, "shape of the mask"),
    ("setitem_tensor", _setitem_oob, IndexError, "index 3 is out of bounds"),
    ("gather", lambda: cg.gather(cg.zeros(2, 3), 1, cg.tensor([[0, 3]])), IndexError, "index 3 is out of bounds"),
    ("index_select", lambda: cg.index_select(cg.zeros(3, 2), 0, cg.tensor([0, 5])), IndexError,
     "index 5 is out of bounds"),
    ("embedding", lambda: cg.embedding(cg.tensor([0, 7]), cg.zeros(5, 2)), IndexError, "index 7 is out of bounds"),
    ("cross_entropy_target", lambda: cg.cross_entropy(cg.zeros(2, 3), cg.tensor([0, 3])), IndexError,
     "Target 3 is out of bounds for 3 classes"),
    ("nll_negative_target", lambda: cg.nll_loss(cg.zeros(2, 3), cg.tensor([-2, 0])), IndexError,
     "Target -2 is out of bounds"),
    ("one_hot_class", lambda: cg.one_hot(cg.tensor([0, 3]), 3), RuntimeError, "smaller than num_classes"),
    ("scatter_add", lambda: cg.scatter_add(cg.zeros(3), 0, cg.tensor([4]), cg.ones(1)), IndexError, "out of bounds"),
    ("index_put_", lambda: cg.zeros(3).index_put_((cg.tensor([0, 5]),), cg.ones(2)), IndexError,
     "index 5 is out of bounds for dimension 0 with size 3"),
    ("index_add", lambda: cg.index_add(cg.zeros(3), 0, cg.tensor([3]), cg.ones(1)), IndexError,
     "index 3 is out of bounds for dimension 0 with size 3"),
    ("index_add_negative", lambda: cg.index_add(cg.zeros(3), 0, cg.tensor([-1]), cg.ones(1)), IndexError,
     "index -1 is out of bounds"),
    ("index_add_source_shape", lambda: cg.index_add(cg.zeros(3, 2), 0, cg.tensor([0, 1]), cg.ones(3, 2)),
     RuntimeError, "index's length 2"),
    ("dim_out_of_range", lambda: cg.zeros(2, 3).sum(-3), IndexError, r"Dimension out of range.*got -3"),
    ("select_out_of_range", lambda: cg.zeros(2, 3).select(1, 5), IndexError, "out of bounds"),
    # shapes
    ("view_incompatible", lambda: cg.zeros(2, 3).view(4, -1), RuntimeError, "shape '.*' is invalid for input of size 6"),
    ("reshape_two_inferred", lambda: cg.zeros(6).reshape(-1, -1), RuntimeError, "only one dimension can be inferred"),
    ("cat_shapes", lambda: cg.cat([cg.zeros(2, 3), cg.zeros(2, 4)]), RuntimeError,
     "Sizes of tensors must match except in dimension 0"),
    ("stack_shapes", lambda: cg.stack([cg.zeros(2), cg.zeros(3)]), RuntimeError, "equal size"),
    ("layer_norm_shape", lambda: cg.layer_norm(cg.zeros(2, 3), (4,)), RuntimeError, "normalized_shape=\\[4\\]"),
    ("cross_entropy_target_shape", lambda: cg.cross_entropy(cg.zeros(2, 3), cg.tensor([0, 1, 1])), RuntimeError,
     r"expected target of shape \[2\]"),
    ("sdpa_head_dims", lambda: cg.scaled_dot_product_attention(cg.zeros(2, 4), cg.zeros(3, 5), cg.zeros(3, 5)),
     RuntimeError, "head dims differ: 4 vs 5"),
]


@pytest.mark.parametrize("name,fn,exc,pattern", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_raises_clear_error_and_process_stays_usable(name, fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()
    assert cg.is_grad_enabled()
    x = cg.tensor([1.0, 2.0], requires_grad=True)
    (x * x).sum().backward()
    assert x.grad.tolist() == [2.0, 4.0]


def test_failed_inplace_ops_leave_the_tensor_untouched():
    t = cg.tensor([1.0, 2.0, 3.0])
    v = t._version
    for bad in (lambda: t.add_(cg.zeros(2, 3)), lambda: t.__setitem__(cg.tensor([0, 9]), 5.0),
                lambda: t.masked_fill_(cg.zeros(2, 3, dtype=cg.bool), 0.0), lambda: t.copy_(cg.zeros(4)),
                lambda: t.__setitem__(slice(None), cg.zeros(2))):
        with pytest.raises((RuntimeError, IndexError)):
            bad()
    assert t.tolist() == [1.0, 2.0, 3.0] and t._version == v


def test_failed_inplace_on_leaf_keeps_it_a_leaf():
    x = _leaf(2)
    with pytest.raises(RuntimeError):
        x.mul_(2)
    assert x.is_leaf and x.grad_fn is None and x.tolist() == [1.0, 1.0]


def test_second_backward_error_then_fresh_graph_works():
    x = _leaf(2)
    y = x.exp().sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()
    x.grad = None
    x.exp().sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.exp([1.0, 1.0]))


def test_kernel_missing_for_a_device_names_kernel_and_device():
    k = cg.dispatch.kernel("test_bad_input_core_probe")  # registered for no backend
    with pytest.raises(NotImplementedError, match="kernel 'test_bad_input_core_probe' has no implementation for "
                                                  "device 'cuda'"):
        k.impl[cg.dispatch.CUDA]()
    assert not cg.dispatch.has_impl("test_bad_input_core_probe", cg.dispatch.CPU)
    del cg.dispatch.KERNELS["test_bad_input_core_probe"]


def test_assigning_a_mismatched_grad_raises():
    x = _leaf(3)
    with pytest.raises(RuntimeError, match="different size"):
        x.grad = cg.zeros(4, dtype=cg.float64)
    with pytest.raises(RuntimeError, match="different type"):
        x.grad = cg.zeros(3)
    with pytest.raises(TypeError, match="Tensor or None"):
        x.grad = [0.0, 0.0, 0.0]
    x.grad = cg.ones(3, dtype=cg.float64)
    (x * 2).sum().backward()
    assert x.grad.tolist() == [3.0, 3.0, 3.0]
    x.grad = None
    assert x.grad is None
