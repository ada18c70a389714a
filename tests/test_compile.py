"""cutegrad.compile: the logic on the CPU over a recording capture engine, the
CPU behaviour (the model itself, unchanged), and GPU tests (marker gpu).

The recording engine stands in for CUDA graphs: `capture(body)` runs the body
once with a capture registered in cutegrad's capture guard (so a host sync
inside raises StreamCaptureError exactly as under a real capture) and returns
a graph whose `replay()` runs the body again. Everything above the engine runs
as on a GPU: signatures, warm-up counts, static inputs, the forward/backward
split through the replay autograd node, parameter discovery, gradient hand-off
to `.grad`, the pending-backward rule, the cache limit and the fallbacks.
"""
import warnings

import numpy as np
import pytest

import cutegrad
import cutegrad.cuda as cuda
import cutegrad.nn as nn
import cutegrad.nn.functional as F
from cutegrad.compile import CompiledCallable
from cutegrad.cuda import capture_guard


class RecordingCapture:
    device = -1

    def __init__(self):
        self.stream_handle = id(self)
        self.aborted = None

    def abort(self, reason):
        self.aborted = reason


class RecordingGraph:
    def __init__(self, body, pool):
        self.body, self.pool_arg, self.replays = body, pool, 0

    def replay(self):
        self.replays += 1
        self.body()

    def pool(self):
        return ("pool", id(self))


class RecordingEngine:
    def __init__(self):
        self.graphs = []

    def capturable(self, devices):
        return len(devices) == 1

    def capture(self, body, pool=None):
        cap = RecordingCapture()
        capture_guard.register(cap)
        try:
            body()
        finally:
            capture_guard.unregister(cap)
        g = RecordingGraph(body, pool)
        self.graphs.append(g)
        return g


class MLP(nn.Module):
    def __init__(self, sync_in_capture=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)
        self.sync_in_capture = sync_in_capture

    def forward(self, x, y=None):
        if self.sync_in_capture and capture_guard.any_capture_underway():
            cuda.synchronize()  # a host sync (timing code, a debug print) inside the forward
        logits = self.fc2(F.gelu(self.fc1(x)))
        loss = None if y is None else F.cross_entropy(logits, y)
        return logits, loss


def twin_models(seed=0):
    cutegrad.manual_seed(seed)
    a = MLP()
    b = MLP()
    b.load_state_dict(a.state_dict())
    return a, b


def batches(rng, n, batch=8):
    return [(cutegrad.tensor(rng.standard_normal((batch, 6)).astype(np.float32)),
             cutegrad.tensor(rng.integers(0, 4, batch))) for _ in range(n)]


def compiled(model, engine, **options):
    return cutegrad.compile(model, options=options or None, _engine=engine)


def train(model, data, accumulate=1):
    opt = cutegrad.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for i, (x, y) in enumerate(data):
        _, loss = model(x, y)
        (loss / accumulate).backward()
        losses.append(float(loss))
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return losses


@pytest.mark.parametrize("accumulate", [1, 3])
def test_captured_training_equals_eager(rng, accumulate):
    eager, model = twin_models()
    engine = RecordingEngine()
    assert compiled(model, engine) is model
    data = batches(rng, 9)
    le = train(eager, data, accumulate)
    lc = train(model, data, accumulate)
    assert lc == le  # bit-equal: replays run the same ops
    for a, b in zip(eager.parameters(), model.parameters()):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
    fwd, bwd = engine.graphs
    assert bwd.pool_arg == fwd.pool()  # the backward shares the forward's pool
    assert fwd.replays == 9 - 2 and bwd.replays == 9 - 2  # 2 eager warm-up calls, then capture + replay
    entry = model.forward.entries[next(iter(model.forward.entries))]
    assert [id(p) for p in entry.params] == [id(p) for p in model.parameters()]


def test_warmup_and_signatures(rng):
    engine = RecordingEngine()
    model = compiled(MLP(), engine, warmup=1)
    x8, x5 = cutegrad.randn(8, 6), cutegrad.randn(5, 6)
    model(x8)
    assert engine.graphs == []  # warm-up call: eager
    model(x8)
    assert len(engine.graphs) == 2  # forward + backward (grad mode on, outputs require grad)
    model(x5)
    model(x5)
    assert len(engine.graphs) == 4  # a new shape captures again
    with cutegrad.no_grad():
        model(x8)
        model(x8)
    assert len(engine.graphs) == 5  # grad mode is part of the signature; no backward graph under no_grad
    model.eval()
    model(x8)
    model(x8)
    assert len(engine.graphs) == 7  # so is training/eval
    with cutegrad.autocast("cpu"):
        model(x8)
        out, _ = model(x8)
    assert len(engine.graphs) == 9 and out.dtype is cutegrad.bfloat16  # and the autocast state


def test_outputs_structure_and_non_tensor_arguments(rng):
    engine = RecordingEngine()

    @cutegrad.compile(options={"warmup": 1}, _engine=engine)
    def f(x, scale, *, extra=None):
        return {"y": x * scale, "n": 3, "pair": (x.sum(), None)}

    x = cutegrad.randn(4)
    for scale in (2.0, 2.0, 3.0, 3.0):
        out = f(x, scale, extra="a")
        assert out["n"] == 3 and out["pair"][1] is None
        np.testing.assert_allclose(out["y"].numpy(), x.numpy() * scale, rtol=1e-6)
    assert len(engine.graphs) == 2  # Python values are baked in: each scale is its own signature
    assert isinstance(f, CompiledCallable) and f.__name__ == "f"


def test_function_with_closed_over_parameters_gets_gradients(rng):
    w = cutegrad.randn(6, 3, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_(True)
    engine = RecordingEngine()
    f = cutegrad.compile(lambda x: (x @ w).tanh().sum(), options={"warmup": 1}, _engine=engine)
    for _ in range(3):
        x = cutegrad.randn(2, 6, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        f(x).backward()
        (xr @ w_ref).tanh().sum().backward()
        np.testing.assert_allclose(x.grad.numpy(), xr.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), w_ref.grad.numpy(), rtol=1e-6)  # accumulated over 3 calls
    assert len(engine.graphs) == 2


def test_two_forwards_before_one_backward(rng):
    eager, model = twin_models()
    compiled(model, RecordingEngine(), warmup=1)
    (x1, y1), (x2, y2) = batches(rng, 2)
    for m in (eager, model):
        m(x1, y1)  # warm-up / capture calls, no backward
    for m in (eager, model):
        (m(x1, y1)[1] + m(x2, y2)[1]).backward()  # the second forward must not overwrite the first's activations
    for a, b in zip(eager.parameters(), model.parameters()):
        np.testing.assert_array_equal(a.grad.numpy(), b.grad.numpy())


def test_dropped_outputs_release_the_pending_backward():
    """Outputs thrown away without a backward free the replay's node at once (no reference cycle waits
    for the garbage collector), so the next call replays instead of running eagerly."""
    import gc
    engine = RecordingEngine()
    model = compiled(MLP(), engine, warmup=1)
    x = cutegrad.randn(2, 6)
    gc.disable()
    try:
        model(x)
        model(x)  # captures and replays; the outputs are dropped
        entry = next(iter(model.forward.entries.values()))
        assert not entry.is_pending()
        kept = model(x)
        assert entry.is_pending()  # a live output that may still be differentiated
        model(x)  # runs eagerly: a replay would overwrite what kept's backward reads
        assert engine.graphs[0].replays == 2
        del kept
        model(x)
        assert engine.graphs[0].replays == 3
    finally:
        gc.enable()


def test_retain_graph_backward_twice(rng):
    eager, model = twin_models()
    compiled(model, RecordingEngine(), warmup=1)
    (x1, y1), (x2, y2) = batches(rng, 2)
    model(x1, y1)
    for m in (eager, model):
        loss = m(x1, y1)[1]
        loss.backward(retain_graph=True)
        loss.backward()  # no call in between: the saved activations are this call's
    for a, b in zip(eager.parameters(), model.parameters()):
        np.testing.assert_array_equal(a.grad.numpy(), b.grad.numpy())
    loss = model(x1, y1)[1]
    loss.backward(retain_graph=True)
    model(x2, y2)  # a newer replay rewrites the activations the first call's graph points at
    with pytest.raises(RuntimeError, match="overwritten"):
        loss.backward()


def test_host_sync_in_capture_falls_back_with_one_warning(rng):
    engine = RecordingEngine()
    model = MLP(sync_in_capture=True)
    compiled(model, engine, warmup=1)
    x = cutegrad.randn(3, 6)
    model(x)
    with pytest.warns(UserWarning, match=r"runs eagerly.*cutegrad\.cuda\.synchronize\(\)") as rec:
        out, _ = model(x)
    assert len(rec) == 1 and not capture_guard.any_capture_underway()
    np.testing.assert_allclose(out.detach().numpy(), model.fc2(F.gelu(model.fc1(x))).detach().numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
        model(cutegrad.randn(4, 6))  # eager from now on, silently
    assert engine.graphs == []


def test_fullgraph_raises_instead_of_falling_back():
    model = compiled(MLP(sync_in_capture=True), None)
    cutegrad.compile(model, fullgraph=True, options={"warmup": 1}, _engine=RecordingEngine())
    x = cutegrad.randn(3, 6)
    model(x)
    with pytest.raises(cuda.StreamCaptureError, match="synchronize"):
        model(x)


def test_cache_size_limit_then_eager_with_one_warning():
    engine = RecordingEngine()
    model = compiled(MLP(), engine, warmup=1, cache_size_limit=2)
    for n in (1, 2):
        model(cutegrad.randn(n, 6))
        model(cutegrad.randn(n, 6))
    with pytest.warns(UserWarning, match="cache_size_limit=2") as rec:
        model(cutegrad.randn(3, 6))
        model(cutegrad.randn(4, 6))
    assert len(rec) == 1 and len(engine.graphs) == 4
    model(cutegrad.randn(2, 6))  # a cached signature still replays
    assert engine.graphs[2].replays == 2  # the capturing call and this one


def test_moved_parameters_capture_again():
    engine = RecordingEngine()
    model = compiled(MLP(), engine, warmup=1)
    x = cutegrad.randn(2, 6)
    model(x)
    model(x)
    model.fc1.weight.data = model.fc1.weight.detach().clone()  # new storage, as a device move gives
    out, _ = model(x)  # eager, then warm-up and capture anew
    model(x)
    assert len(engine.graphs) == 2
    model(x)
    assert len(engine.graphs) == 4
    np.testing.assert_allclose(out.detach().numpy(), model(x)[0].detach().numpy())
    model.register_buffer("scale", cutegrad.ones(1))
    model(x)  # a new buffer is not read by the graphs (the forward ignores it): no recapture
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach() * 2)  # a replaced parameter object
    out, _ = model(x)
    np.testing.assert_allclose(out.detach().numpy(), model.fc2(F.gelu(model.fc1(x))).detach().numpy(), rtol=1e-6)
    model(x)
    model(x)
    assert len(engine.graphs) == 6


def test_cpu_inputs_run_the_model_itself(rng):
    """The real engine (CUDA graphs) leaves CPU calls alone: same module, same keys, eager results."""
    eager, model = twin_models()
    keys = list(model.state_dict())
    assert cutegrad.compile(model) is model and model._orig_mod is model
    assert list(model.state_dict()) == keys
    data = batches(rng, 4)
    assert train(model, data) == train(eager, data)
    assert model.forward.entries == {}
    sd = model.state_dict()
    fresh = MLP()
    fresh.load_state_dict(sd)


def test_copies_of_a_compiled_model_start_uncaptured(rng):
    import copy
    engine = RecordingEngine()
    model = compiled(MLP(), engine, warmup=1)
    x = cutegrad.randn(2, 6)
    model(x)
    model(x)
    twin = copy.deepcopy(model)
    assert twin.forward.entries == {} and twin.forward.module is twin and twin.forward.fn.__self__ is twin
    np.testing.assert_array_equal(twin(x)[0].detach().numpy(), model(x)[0].detach().numpy())
    assert list(twin.state_dict()) == list(model.state_dict())


def test_compile_arguments():
    m = MLP()
    assert cutegrad.compile(m, disable=True) is m and not isinstance(m.forward, CompiledCallable)
    assert cutegrad.compile(m, backend="eager") is m and not isinstance(m.forward, CompiledCallable)
    assert cutegrad.compile(m, mode="max-autotune-no-cudagraphs") is m
    for kw in ({"mode": "fast"}, {"backend": "tvm"}, {"backend": print}, {"dynamic": "yes"},
               {"options": {"warmup": 0}}, {"options": {"cache_size_limit": -1}}):
        with pytest.raises(ValueError):
            cutegrad.compile(m, **kw)
    with pytest.warns(UserWarning, match="ignoring options"):
        cutegrad.compile(m, options={"epilogue_fusion": True})
    with pytest.raises(TypeError, match="callable"):
        cutegrad.compile(3)
    cutegrad.compile(m, mode="reduce-overhead", dynamic=False, backend="inductor")
    first = m.forward
    cutegrad.compile(m)
    assert m.forward.fn is first.fn  # compiling again wraps the original forward, not the wrapper


# -- GPU ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU and driver")


def gpt_pair():
    from cutegrad.models import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    cutegrad.manual_seed(0)
    a = GPT(cfg).to("cuda")
    b = GPT(cfg).to("cuda")
    b.load_state_dict(a.state_dict())
    return a, b


def lm_loss(m, d):
    logits = m(d[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), d[:, 1:].reshape(-1))


@pytest.mark.gpu
@gpu
def test_gpu_compile_captures_and_replays_with_eager_losses():
    eager, model = gpt_pair()
    assert cutegrad.compile(model) is model
    gen = np.random.default_rng(0)
    data = [cutegrad.tensor(gen.integers(0, 64, (4, 33))).to("cuda") for _ in range(12)]
    losses = []
    for m in (eager, model):
        opt = cutegrad.optim.AdamW(m.parameters(), lr=1e-3)
        ls = []
        for d in data:
            loss = lm_loss(m, d)
            loss.backward()
            opt.step()
            opt.zero_grad()
            ls.append(loss)  # kept across steps: compiled outputs must not be overwritten
        losses.append([float(v) for v in ls])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    entry = next(iter(model.forward.entries.values()))
    assert not isinstance(entry, int) and entry.bwd is not None  # it did capture


@pytest.mark.gpu
@gpu
def test_gpu_item_in_forward_falls_back_naming_the_op():
    class Syncing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            y = self.lin(x)
            if y.sum().item() > 1e30:
                y = y * 0
            return y

    m = cutegrad.compile(Syncing().to("cuda"))
    x = cutegrad.randn(4, 8, device="cuda")
    m(x)
    m(x)
    with pytest.warns(UserWarning, match=r"item\(\)"):
        y = m(x)
    np.testing.assert_allclose(y.detach().cpu().numpy(), m.lin(x).detach().cpu().numpy(), rtol=1e-6)
    assert not capture_guard.any_capture_underway()


@pytest.mark.gpu
@gpu
def test_gpu_compiled_model_inside_graphed_step():
    """graphed(step) around a compiled model: the outer capture records the model's ops eagerly."""
    import cutegrad.graphs as graphs
    eager, model = gpt_pair()
    cutegrad.compile(model)
    gen = np.random.default_rng(1)
    data = [cutegrad.tensor(gen.integers(0, 64, (4, 33))).to("cuda") for _ in range(6)]
    results = []
    for m in (eager, model):
        opt = cutegrad.optim.AdamW(m.parameters(), lr=1e-3)

        def step(d):
            loss = lm_loss(m, d)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            return loss

        g = graphs.graphed(step, (data[0],), warmup=3)
        results.append([float(g(d)) for d in data])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_module_compile_method_compiles_in_place_like_torch(rng):
    """nn.Module.compile(**kwargs): torch's in-place form; returns None, the module's calls go through the
    compiled callable (captured and replayed here by the recording engine), with losses equal to eager."""
    torch = pytest.importorskip("torch")
    assert torch.nn.Linear(2, 2).compile(backend="eager") is None  # torch's form, for comparison
    eager, model = twin_models()
    engine = RecordingEngine()
    assert model.compile(options={"warmup": 1}, _engine=engine) is None
    assert isinstance(model.forward, CompiledCallable)
    data = batches(rng, 5)
    assert train(model, data) == train(eager, data)
    assert [g.replays for g in engine.graphs] == [4, 4]  # one warm-up call, then forward and backward replayed
    plain = MLP()
    assert plain.compile(mode="max-autotune-no-cudagraphs") is None and not isinstance(plain.forward,
                                                                                        CompiledCallable)
