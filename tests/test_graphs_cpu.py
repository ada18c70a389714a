"""cutegrad.graphs bookkeeping that needs no GPU: the Philox generator's offsets in
eager mode and under capture, replay updates, and CUDAGraph state errors."""
import pytest

from cutegrad.cuda import capture_guard
from cutegrad.graphs import rng
from cutegrad.graphs import CUDAGraph, Generator, GraphRngState, PhiloxArgs


class FakeCapture:
    """Stands in for graphs' _Capture: an origin stream and per-generator states."""

    def __init__(self, device=0, stream_handle=0x1000, buffer_base=0x7000_0000):
        self.device = device
        self.stream_handle = stream_handle
        self.rng = {}
        self._next = buffer_base
        self.aborted = []

    def rng_state(self, generator):
        st = self.rng.get(generator)
        if st is None:
            st = self.rng[generator] = GraphRngState(generator, self._next)
            self._next += 16
        return st

    def abort(self, reason):
        self.aborted.append(reason)


@pytest.fixture
def capture(monkeypatch):
    cap = FakeCapture()
    status = {"stream": cap.stream_handle, "capturing": True}
    monkeypatch.setattr(rng, "_current_stream_capture_status",
                        lambda device: (status["stream"], status["capturing"]))
    capture_guard.register(cap)
    cap.status = status
    yield cap
    capture_guard.unregister(cap)


def effective(args, words=None):
    """The (seed, offset) a kernel computes from PhiloxArgs and the graph buffer's words."""
    if not args.offset_ptr:
        return args.seed, args.offset
    seed = words[0] | words[4] << 32
    base = words[8] | words[12] << 32
    return seed, base + args.offset


def test_eager_offsets_advance_in_multiples_of_four():
    g = Generator(0, seed=123)
    a = g.philox_args(5)
    b = g.philox_args(4)
    c = g.philox_args(1)
    assert a == PhiloxArgs(123, 0, 0, 0)
    assert b == PhiloxArgs(123, 0, 8, 0)
    assert c == PhiloxArgs(123, 0, 12, 0)
    assert g.get_state() == (123, 16)
    g.manual_seed(7)
    assert g.get_state() == (7, 0) and g.philox_args(3).offset == 0


@pytest.mark.parametrize("bad", [0, -4, 2.0, None])
def test_philox_args_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="positive int"):
        Generator(0).philox_args(bad)


@pytest.mark.parametrize("bad", [-1, 1 << 64, 1.5, "1"])
def test_seed_must_be_uint64(bad):
    with pytest.raises(ValueError, match="seed must be an int"):
        Generator(0).manual_seed(bad)


def test_set_state_validates_offset():
    g = Generator(0)
    g.set_state((5, 40))
    assert g.get_state() == (5, 40)
    with pytest.raises(ValueError, match="multiple of 4"):
        g.set_state((5, 6))


def test_module_manual_seed_reaches_existing_and_future_generators():
    g = rng.default_generator(0)
    g.philox_args(8)
    rng.manual_seed(99)
    assert g.get_state() == (99, 0)
    assert rng.default_generator(5).initial_seed() == 99
    assert rng.default_generator(0) is g


def test_captured_ops_take_offsets_within_graph(capture):
    g = Generator(0, seed=11)
    capture_guard.unregister(capture)
    g.philox_args(8)  # eager, before the capture
    capture_guard.register(capture)
    a = g.philox_args(6)
    b = g.philox_args(10)
    st = capture.rng[g]
    assert a == PhiloxArgs(0, st.buffer_ptr, 0, st.buffer_ptr + 8)
    assert b == PhiloxArgs(0, st.buffer_ptr, 8, st.buffer_ptr + 8)
    assert st.total == 20
    assert g.get_state() == (11, 8)  # capture does not move the host offset


def test_op_on_unrelated_stream_during_capture_is_eager(capture):
    capture.status.update(stream=0x9999, capturing=False)
    g = Generator(0, seed=3)
    assert g.philox_args(4) == PhiloxArgs(3, 0, 0, 0)
    assert capture.rng == {}
    # A stream joined to the capture (the driver says it is capturing) is captured.
    capture.status.update(capturing=True)
    assert g.philox_args(4).offset_ptr != 0


def test_generator_of_another_device_is_not_captured(capture):
    g = Generator(1, seed=3)
    assert g.philox_args(4) == PhiloxArgs(3, 0, 0, 0)


def test_replays_draw_what_eager_execution_would(capture):
    """Eager e1, graph [a, b] replayed twice, eager e2 == eager e1, a, b, a, b, e2."""
    seed = 1234
    sizes = {"e1": 5, "a": 12, "b": 7, "e2": 9}

    ref = Generator(0, seed=seed)
    capture_guard.unregister(capture)
    expected = [(seed, ref.philox_args(sizes[k]).offset) for k in ("e1", "a", "b", "a", "b", "e2")]
    capture_guard.register(capture)

    g = Generator(0, seed=seed)
    capture_guard.unregister(capture)
    got = [effective(g.philox_args(sizes["e1"]))]
    capture_guard.register(capture)
    cap_a = g.philox_args(sizes["a"])
    cap_b = g.philox_args(sizes["b"])
    capture_guard.unregister(capture)
    st = capture.rng[g]
    words = {}
    for _ in range(2):  # replay: apply the buffer writes, then the graph's ops read it
        for byte, value in st.next_replay_words():
            words[byte] = value
        got += [effective(cap_a, words), effective(cap_b, words)]
    got.append(effective(g.philox_args(sizes["e2"])))
    assert got == expected
    assert len({off for _, off in got}) == len(got)  # no two draws share numbers


def test_replay_writes_only_changed_words(capture):
    g = Generator(0, seed=(5 << 32) | 6)
    g.philox_args(4)
    capture_guard.unregister(capture)
    st = capture.rng[g]
    first = st.next_replay_words()
    assert first == [(0, 6), (4, 5), (8, 0), (12, 0)]
    assert st.next_replay_words() == [(8, 4)]
    g.manual_seed(6)  # takes effect at the next replay
    assert st.next_replay_words() == [(4, 0), (8, 0)]
    g.set_state((6, (1 << 32) - 4))
    assert st.next_replay_words() == [(8, (1 << 32) - 4)]
    assert st.next_replay_words() == [(8, 0), (12, 1)]  # carry into the high word
    assert g.get_state() == (6, (1 << 32) + 4)


def test_cuda_graph_state_errors_without_capture():
    g = CUDAGraph()
    assert g.pool() is None and not g.is_capturing
    with pytest.raises(RuntimeError, match="holds no captured graph"):
        g.replay()
    with pytest.raises(RuntimeError, match="not capturing"):
        g.capture_end()
    g.reset()  # nothing to release


class _CountingGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_graphed_step_checks_inputs_then_copies_and_replays():
    import cutegrad
    from cutegrad.graphs import GraphedStep
    static = (cutegrad.zeros(2, 3), cutegrad.zeros(4, dtype=cutegrad.int64))
    out = cutegrad.zeros(1)
    g = _CountingGraph()
    step = GraphedStep(g, static, out)
    with pytest.raises(TypeError, match="captured with 2 input"):
        step(cutegrad.ones(2, 3))
    with pytest.raises(ValueError, match=r"input 0 is \(3, 2\).*captured with \(2, 3\)"):
        step(cutegrad.ones(3, 2), cutegrad.ones(4, dtype=cutegrad.int64))
    with pytest.raises(ValueError, match="input 1 is .*float32.*captured with .*int64"):
        step(cutegrad.ones(2, 3), cutegrad.ones(4))
    with pytest.raises(TypeError, match="must be a Tensor"):
        step(cutegrad.ones(2, 3), [1, 2, 3, 4])
    assert g.replays == 0 and static[0].sum().item() == 0  # nothing ran on a bad call
    assert step(cutegrad.ones(2, 3), cutegrad.full((4,), 7, dtype=cutegrad.int64)) is out
    assert g.replays == 1
    assert static[0].tolist() == [[1.0] * 3] * 2 and static[1].tolist() == [7] * 4


def test_graphed_rejects_bad_arguments_before_touching_cuda():
    import cutegrad
    from cutegrad.graphs import graphed
    with pytest.raises(ValueError, match="sample input 0 must be a CUDA tensor"):
        graphed(lambda x: x, cutegrad.zeros(3))
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        graphed(lambda: None, (), warmup=0)
