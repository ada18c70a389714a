"""DistributedDataParallel's mechanics in one process (a world of 1 on the "cpu" backend): buckets in
reverse order, reductions launched during the backward as buckets fill, .grad as bucket views, no_sync,
and the errors. Equality with one process at two ranks is in test_distributed_cpu.py."""
import socket

import numpy as np
import pytest

import cutegrad as cg
import cutegrad.distributed as dist
from cutegrad.nn.parallel import DistributedDataParallel


@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("cpu", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=30)
    yield
    dist.destroy_process_group()


def _mlp():
    cg.manual_seed(0)
    return cg.nn.Sequential(cg.nn.Linear(6, 32), cg.nn.ReLU(), cg.nn.Linear(32, 32), cg.nn.ReLU(),
                            cg.nn.Linear(32, 3))


def test_buckets_follow_reverse_order_and_reduce_during_the_backward(world_of_one, monkeypatch):
    model = _mlp()
    ddp = DistributedDataParallel(model, bucket_cap_mb=32 * 32 * 4 / 2 ** 20)  # one big weight per bucket
    params = list(model.parameters())
    first_bucket = ddp._buckets[0].params
    assert first_bucket[0] is params[-1]  # the last layer's parameters come first
    arrived_at_launch = []
    real = dist.all_reduce

    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        arrived_at_launch.append(sum(p.grad is not None for p in params))
        return real(tensor, op=op, group=group, async_op=async_op)
    monkeypatch.setattr(dist, "all_reduce", spy)
    x = cg.tensor(np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32))
    ddp(x).sum().backward()
    assert len(arrived_at_launch) == len(ddp._buckets) > 2
    assert arrived_at_launch[0] < len(params) - 1  # the first reduction started long before the backward ended
    assert arrived_at_launch == sorted(arrived_at_launch)
    flat_ids = {id(b.flat._storage) for b in ddp._buckets}
    assert all(id(p.grad._storage) in flat_ids for p in params)  # .grad is a view of its bucket


def test_gradients_match_the_plain_model_and_no_sync_accumulates(world_of_one):
    x = cg.tensor(np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32))
    plain = _mlp()
    (plain(x).sum() * 2).backward()
    model = _mlp()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
    with ddp.no_sync():
        ddp(x).sum().backward()
    ddp(x).sum().backward()
    for a, b in zip(plain.parameters(), model.parameters()):
        np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_unused_parameters_and_bad_arguments_are_named(world_of_one):
    model = _mlp()
    extra = cg.nn.Linear(2, 2)
    holder = cg.nn.ModuleDict({"used": model, "unused": extra})
    ddp = DistributedDataParallel(holder)
    x = cg.ones(2, 6)
    holder["used"](x).sum().backward()  # "unused" gets no gradient
    with pytest.raises(RuntimeError, match="unused.weight"):
        ddp(x)
    with pytest.raises(NotImplementedError, match="find_unused_parameters"):
        DistributedDataParallel(model, find_unused_parameters=True)
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        DistributedDataParallel(model, bucket_cap_mb=0)
    with pytest.raises(TypeError, match="nn.Module"):
        DistributedDataParallel(lambda v: v)


def test_ddp_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDataParallel(_mlp())


def test_gloo_names_the_cpu_backend():
    """torch's CPU scripts say init_process_group("gloo"): the "cpu" backend answers to it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=30)
    try:
        assert dist.get_backend() == "cpu"
        t = cg.tensor(np.arange(5, dtype=np.float32))
        dist.all_reduce(t)
        np.testing.assert_array_equal(t.numpy(), np.arange(5, dtype=np.float32))
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        dist.init_process_group("mpi")
