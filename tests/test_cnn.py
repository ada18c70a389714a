"""A small CNN on CIFAR-10-shaped data (3x32x32 images, 10 classes): Conv2d, BatchNorm2d, ReLU, pooling,
Flatten, Linear. On the CPU it matches torch step for step from the same weights, and its loss falls; the
same model trains on CUDA under the gpu marker (against the CPU run)."""
import numpy as np
import pytest

import cutegrad as cg

torch = pytest.importorskip("torch", reason="PyTorch CPU is the differential reference")


def _net(lib):
    nn = lib.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(16, 16, 3, padding="same", groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(64, 10))


def _data(n=32, seed=0):
    """Images whose class shifts the mean of one channel of one quadrant: learnable, CIFAR-shaped."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, c % 3, (c // 3 % 2) * 16:(c // 3 % 2) * 16 + 16, (c // 6) * 16:(c // 6) * 16 + 16] += 1.5
    return x, y.astype(np.int64)


def _twins():
    torch.manual_seed(0)
    tnet = _net(torch)
    net = _net(cg)
    net.load_state_dict({k: cg.tensor(v.detach().numpy()) for k, v in tnet.state_dict().items()})
    return net, tnet


def _step(lib, net, opt, x, y):
    opt.zero_grad()
    loss = lib.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def test_cnn_matches_torch_step_by_step_and_learns():
    net, tnet = _twins()
    assert sorted(net.state_dict()) == sorted(tnet.state_dict())
    opt = cg.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.05, momentum=0.9)
    x, y = _data()
    ours, ref = [], []
    for step in range(25):
        ours.append(_step(cg, net, opt, cg.tensor(x), cg.tensor(y)))
        ref.append(_step(torch, tnet, topt, torch.tensor(x), torch.tensor(y)))
        if step < 5:  # float32 through different summation orders: equal to rounding for the first steps
            np.testing.assert_allclose(ours[-1], ref[-1], rtol=1e-4, err_msg=f"step {step}")
    assert ours[-1] < 0.5 * ours[0], ours
    for (name, a), (_, b) in zip(net.state_dict().items(), tnet.state_dict().items()):
        if "num_batches" in name:
            assert int(a) == int(b) == 25
    net.eval(), tnet.eval()
    xe, _ = _data(8, seed=1)
    with cg.no_grad(), torch.no_grad():
        np.testing.assert_allclose(net(cg.tensor(xe)).numpy(), tnet(torch.tensor(xe)).numpy(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cnn_trains_on_cuda_as_on_the_cpu():
    from test_cuda_ops import _SKIP
    if _SKIP is not None:
        pytest.skip(_SKIP)
    net, _ = _twins()
    gnet, _ = _twins()
    gnet = gnet.to("cuda")
    opt = cg.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gopt = cg.optim.SGD(gnet.parameters(), lr=0.05, momentum=0.9)
    x, y = _data()
    cpu, gpu = [], []
    for step in range(25):
        cpu.append(_step(cg, net, opt, cg.tensor(x), cg.tensor(y)))
        gpu.append(_step(cg, gnet, gopt, cg.tensor(x, device="cuda"), cg.tensor(y, device="cuda")))
        if step < 5:
            np.testing.assert_allclose(gpu[-1], cpu[-1], rtol=2e-3, err_msg=f"step {step}")
    assert gpu[-1] < 0.5 * gpu[0], gpu
    assert all(p.device.type == "cuda" for p in gnet.parameters())
    assert gnet[1].running_mean.device.type == "cuda" and int(gnet[1].num_batches_tracked) == 25
