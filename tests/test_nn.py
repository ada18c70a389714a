"""nn.Module behaviour and every layer against torch.nn with identical weights."""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad import nn

torch = pytest.importorskip("torch", reason="PyTorch CPU is the differential reference")


def _copy_weights(src, dst):
    """cutegrad module -> torch module with the same parameter names."""
    dst.load_state_dict({k: torch.from_numpy(np.array(v.numpy())) for k, v in src.state_dict().items()})


def _t(x):
    return torch.from_numpy(np.array(x.detach().numpy()))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.layers = nn.ModuleList([nn.Linear(7, 7), nn.Linear(7, 3, bias=False)])
        self.register_buffer("scale", cg.ones(3))
        self.register_buffer("scratch", cg.zeros(2), persistent=False)

    def forward(self, x):
        h = self.norm(self.fc(x)).relu()
        for layer in self.layers:
            h = layer(h)
        return h * self.scale


def test_module_tree_and_state_dict_keys():
    m = Block()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["fc.weight", "fc.bias", "norm.weight", "norm.bias", "layers.0.weight", "layers.0.bias",
                     "layers.1.weight"]
    # torch's order: a module's own parameters and buffers, then its children's
    assert list(m.state_dict()) == ["scale"] + names
    assert [n for n, _ in m.named_buffers()] == ["scale", "scratch"]
    assert len(list(m.modules())) == 6 and len(list(m.children())) == 3
    assert isinstance(m.layers[1], nn.Linear) and m.layers[-1] is m.layers[1]


def test_state_dict_roundtrip_and_strict_errors():
    a, b = Block(), Block()
    b.load_state_dict(a.state_dict())
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=k)
    sd = a.state_dict()
    sd.pop("fc.bias")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "fc.bias"'):
        b.load_state_dict(sd)
    sd = a.state_dict()
    sd["extra.weight"] = cg.zeros(1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "extra.weight"'):
        b.load_state_dict(sd)
    result = b.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["extra.weight"] and result.missing_keys == []
    sd = a.state_dict()
    sd["fc.weight"] = cg.zeros(7, 4)
    before = b.fc.weight.detach().numpy().copy()
    with pytest.raises(RuntimeError, match=r"size mismatch for fc.weight: copying a param with shape \[7, 4\]"):
        b.load_state_dict(sd)
    np.testing.assert_array_equal(b.fc.weight.detach().numpy(), before)  # nothing half-loaded


def test_train_eval_zero_grad_and_dtype_move_keep_parameter_identity():
    m = Block()
    assert m.training and m.layers[0].training
    m.eval()
    assert not m.training and not m.layers[0].training
    w = m.fc.weight
    m(cg.randn(4, 5)).sum().backward()
    assert w.grad is not None
    m.zero_grad()
    assert w.grad is None
    m.double()
    assert m.fc.weight is w and w.dtype == cg.float64 and m.scale.dtype == cg.float64
    m(cg.randn(4, 5, dtype=cg.float64)).sum().backward()
    assert w.grad.dtype == cg.float64


def test_assigning_wrong_types_raises():
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        m.weight = cg.zeros(2, 2)
    with pytest.raises(TypeError):
        nn.Parameter([1.0, 2.0])


@pytest.mark.parametrize("make", [
    lambda: (nn.Linear(6, 9), torch.nn.Linear(6, 9)),
    lambda: (nn.Linear(6, 9, bias=False), torch.nn.Linear(6, 9, bias=False)),
    lambda: (nn.LayerNorm(6), torch.nn.LayerNorm(6)),
    lambda: (nn.LayerNorm(6, elementwise_affine=False), torch.nn.LayerNorm(6, elementwise_affine=False)),
    lambda: (nn.RMSNorm(6), torch.nn.RMSNorm(6)),
    lambda: (nn.RMSNorm(6, eps=1e-5), torch.nn.RMSNorm(6, eps=1e-5)),
    lambda: (nn.GELU(), torch.nn.GELU()),
    lambda: (nn.GELU("tanh"), torch.nn.GELU("tanh")),
    lambda: (nn.SiLU(), torch.nn.SiLU()),
    lambda: (nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)),
             torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))),
])
def test_layer_matches_torch_forward_and_backward(make):
    ours, ref = make()
    _copy_weights(ours, ref)
    x = np.random.default_rng(1).standard_normal((3, 5, 6)).astype(np.float32)
    xc = cg.tensor(x, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    out, tout = ours(xc), ref(xt)
    np.testing.assert_allclose(out.detach().numpy(), tout.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = np.random.default_rng(2).standard_normal(tout.shape).astype(np.float32)
    out.backward(cg.tensor(g))
    tout.backward(torch.from_numpy(g))
    np.testing.assert_allclose(xc.grad.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    for (name, p), (_, tp) in zip(ours.named_parameters(), ref.named_parameters()):
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_embedding_matches_torch_including_padding_idx():
    ours = nn.Embedding(11, 4, padding_idx=3)
    ref = torch.nn.Embedding(11, 4, padding_idx=3)
    _copy_weights(ours, ref)
    np.testing.assert_array_equal(ours.weight.detach().numpy()[3], 0)
    idx = np.array([[1, 3, 3], [10, 0, 1]])
    out, tout = ours(cg.tensor(idx)), ref(torch.from_numpy(idx))
    np.testing.assert_array_equal(out.detach().numpy(), tout.detach().numpy())
    g = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    out.backward(cg.tensor(g))
    tout.backward(torch.from_numpy(g))
    np.testing.assert_allclose(ours.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-6)
    with pytest.raises(IndexError, match="out of bounds"):
        ours(cg.tensor([11]))


def test_dropout_module_train_and_eval():
    d = nn.Dropout(0.25)
    x = cg.ones(2000)
    cg.manual_seed(0)
    y = d(x).numpy()
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(1.5)


def test_init_functions_statistics():
    cg.manual_seed(0)
    w = cg.empty(400, 300)
    nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)
    a = w.numpy()
    assert a.min() >= -0.04 and a.max() <= 0.04 and abs(a.std() - 0.0176) < 0.001
    nn.init.xavier_uniform_(w)
    bound = np.sqrt(6 / 700)
    assert np.abs(w.numpy()).max() <= bound and w.numpy().std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    nn.init.kaiming_normal_(w, nonlinearity="relu")
    assert w.numpy().std() == pytest.approx(np.sqrt(2 / 300), rel=0.02)
    nn.init.zeros_(w)
    assert not w.numpy().any()


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(np.float32) * 3 for s in [(3, 4), (7,), (2, 2, 2)]]
    ps = [cg.zeros(g.shape, requires_grad=True) for g in grads]
    tps = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for p, tp, g in zip(ps, tps, grads):
        p.grad = cg.tensor(g)
        tp.grad = torch.from_numpy(g.copy())
    for norm_type in (2.0, 1.0, float("inf")):
        total = nn.utils.clip_grad_norm_(ps, 1.5, norm_type)
        ttotal = torch.nn.utils.clip_grad_norm_(tps, 1.5, norm_type)
        assert total.item() == pytest.approx(ttotal.item(), rel=1e-5)
        for p, tp in zip(ps, tps):
            np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-5, atol=1e-7)
