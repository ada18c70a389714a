"""init_process_group's argument and rendezvous errors, in this process (no peers needed)."""
import socket

import pytest

import cutegrad.distributed as dist


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env_rendezvous_names_what_is_missing(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE is not set"):
        dist.init_process_group("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT"):
        dist.init_process_group("cpu")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two' is not an integer"):
        dist.init_process_group("cpu")
    assert not dist.is_initialized()


def test_bad_arguments():
    url = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        dist.init_process_group("mpi", init_method=url, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"rank 3 is outside \[0, 2\)"):
        dist.init_process_group("cpu", init_method=url, rank=3, world_size=2)
    with pytest.raises(ValueError, match="timeout must be positive"):
        dist.init_process_group("cpu", init_method=url, rank=0, world_size=1, timeout=0)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        dist.init_process_group("cpu", init_method="tcp://nohost", rank=0, world_size=1)
    with pytest.raises(ValueError, match="not supported"):
        dist.init_process_group("cpu", init_method="file:///tmp/x", rank=0, world_size=1)


def test_a_rank_whose_rank_0_never_comes_times_out():
    url = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(dist.DistributedError, match="could not reach the rendezvous store"):
        dist.init_process_group("cpu", init_method=url, rank=1, world_size=2, timeout=1.0)
    assert not dist.is_initialized()


def test_a_busy_port_is_reported():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(dist.DistributedError, match=f"cannot listen on 127.0.0.1:{port}"):
            dist.init_process_group("cpu", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def test_world_of_one_works_and_tears_down():
    dist.init_process_group("cpu", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "cpu")
    import cutegrad as cg
    t = cg.arange(5, dtype=cg.float32)
    assert dist.all_reduce(t, async_op=True).wait()
    assert t.numpy().tolist() == [0, 1, 2, 3, 4]
    dist.destroy_process_group()
    with pytest.raises(dist.DistributedError, match="no process group"):
        dist.destroy_process_group()


def test_skip_cross_rank_checks_nests_and_is_per_thread():
    import threading
    from cutegrad.distributed.process_group import cross_rank_checks_wanted, skip_cross_rank_checks
    assert cross_rank_checks_wanted()
    with skip_cross_rank_checks():
        with skip_cross_rank_checks():
            assert not cross_rank_checks_wanted()
        assert not cross_rank_checks_wanted()
        seen = []
        t = threading.Thread(target=lambda: seen.append(cross_rank_checks_wanted()))
        t.start()
        t.join()
        assert seen == [True]
    assert cross_rank_checks_wanted()
