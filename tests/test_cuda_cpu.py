"""cutegrad.cuda without a GPU: availability, the no-device error, error conversion
and the capture guard's bookkeeping (all testable on a CPU-only machine)."""
import subprocess
import sys
import threading
import types

import pytest

import cutegrad.cuda as cuda
from cutegrad.cuda import capture_guard, driver

no_gpu = pytest.mark.skipif(cuda.is_available(), reason="checks behaviour on a machine without a GPU")


class FakeCapture:
    def __init__(self, device=0, stream_handle=0x1000):
        self.device = device
        self.stream_handle = stream_handle
        self.aborted = []

    def abort(self, reason):
        self.aborted.append(reason)


@pytest.fixture
def fake_capture():
    cap = FakeCapture()
    capture_guard.register(cap)
    yield cap
    capture_guard.unregister(cap)


def test_import_does_not_load_cuda_bindings():
    code = ("import sys, cutegrad, cutegrad.cuda, cutegrad.graphs; "
            "print(any(m.startswith('cuda.bindings') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@no_gpu
def test_is_available_false_without_raising():
    assert cuda.is_available() is False
    assert cuda.is_available() is False  # the cached failure also does not raise
    assert cuda.device_count() == 0
    assert cuda.is_current_stream_capturing() is False


@no_gpu
@pytest.mark.parametrize("use", [
    lambda: cuda.current_device(),
    lambda: cuda.set_device(0),
    lambda: cuda.current_stream(),
    lambda: cuda.default_stream(),
    lambda: cuda.Stream(),
    lambda: cuda.Event().record(),
    lambda: cuda.synchronize(),
    lambda: cuda.get_device_properties(0),
    lambda: cuda.mem_get_info(),
    lambda: cuda.device(0),
])
def test_first_cuda_use_raises_clear_error(use):
    with pytest.raises(cuda.CudaNotAvailableError, match="no CUDA device available"):
        use()


@no_gpu
def test_graph_apis_raise_no_device_error():
    import cutegrad.graphs as graphs
    with pytest.raises(cuda.CudaNotAvailableError, match="no CUDA device available"):
        graphs.CUDAGraph().capture_begin()
    with pytest.raises(cuda.CudaNotAvailableError, match="no CUDA device available"):
        with graphs.graph(graphs.CUDAGraph()):
            pass
    with pytest.raises(cuda.CudaNotAvailableError, match="no CUDA device available"):
        graphs.graph_pool_handle()


def test_error_hierarchy():
    assert issubclass(cuda.CudaError, RuntimeError)
    assert issubclass(cuda.CudaNotAvailableError, cuda.CudaError)
    assert issubclass(cuda.StreamCaptureError, cuda.CudaError)


@pytest.fixture
def fake_driver(monkeypatch):
    """cuda.bindings' real enums with fake functions, so error paths run without a GPU."""
    bindings = pytest.importorskip("cuda.bindings.driver")
    calls = []
    ns = types.SimpleNamespace(
        CUresult=bindings.CUresult,
        cuGetErrorString=lambda err: (1, None),  # as if the driver could not describe it
        cuMemcpyAsync=lambda *a: calls.append(("cuMemcpyAsync", a)) or (0,),
        cuStreamQuery=lambda s: (600,),
        cuMemGetInfo=lambda: (0, 5, 10),
        cuDeviceGet=lambda i: (0, i),
        cuMemAlloc=lambda n: (int(bindings.CUresult.CUDA_ERROR_OUT_OF_MEMORY), 0),
        cuStreamSynchronize=lambda s: (int(bindings.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED),),
    )
    codes = frozenset(int(getattr(bindings.CUresult, n)) for n in driver._CAPTURE_ERROR_NAMES
                      if hasattr(bindings.CUresult, n))
    monkeypatch.setattr(driver, "_drv", ns)
    monkeypatch.setattr(driver, "_capture_error_codes", codes)
    return calls


def test_call_unpacks_outputs(fake_driver):
    assert driver.call("cuMemcpyAsync", 1, 2, 3, 4) is None
    assert fake_driver == [("cuMemcpyAsync", (1, 2, 3, 4))]
    assert driver.call("cuDeviceGet", 3) == 3
    assert driver.call("cuMemGetInfo") == (5, 10)
    assert driver.call_status("cuStreamQuery", 0) == driver.NOT_READY


def test_failed_call_names_call_and_cuda_error(fake_driver):
    with pytest.raises(cuda.CudaError) as ei:
        driver.call("cuMemAlloc", 1 << 40)
    e = ei.value
    assert not isinstance(e, cuda.StreamCaptureError)
    assert e.call == "cuMemAlloc" and e.error_name == "CUDA_ERROR_OUT_OF_MEMORY" and e.code == 2
    assert "cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY" in str(e)


def test_capture_refusal_aborts_this_threads_captures(fake_driver, fake_capture):
    with pytest.raises(cuda.StreamCaptureError) as ei:
        driver.call("cuStreamSynchronize", 0)
    assert "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED" in str(ei.value)
    assert "discarded 1 capture" in str(ei.value)
    assert fake_capture.aborted and "cuStreamSynchronize" in fake_capture.aborted[0]
    assert capture_guard.thread_captures() == []
    assert not capture_guard.any_capture_underway()


def test_raw_memory_call_refused_during_capture(fake_driver, fake_capture):
    with pytest.raises(cuda.StreamCaptureError, match="raw driver memory call cuMemAlloc"):
        driver.call("cuMemAlloc", 1024)
    assert fake_capture.aborted
    # Outside a capture the same call reaches the driver (which here reports OOM).
    with pytest.raises(cuda.CudaError, match="CUDA_ERROR_OUT_OF_MEMORY"):
        driver.call("cuMemAlloc", 1024)


def test_guard_is_silent_without_captures():
    assert not capture_guard.any_capture_underway()
    capture_guard._check_not_capturing("Tensor.item()")


def test_guard_aborts_and_names_operation(fake_capture):
    other = FakeCapture(stream_handle=0x2000)
    capture_guard.register(other)
    assert capture_guard.any_capture_underway()
    assert capture_guard.capture_of_stream(0, 0x1000) is fake_capture
    with pytest.raises(cuda.StreamCaptureError, match=r"Tensor\.item\(\) is not allowed") as ei:
        capture_guard._check_not_capturing("Tensor.item()")
    assert "2 in this thread" in str(ei.value)
    assert fake_capture.aborted == ["Tensor.item() was called during capture"]
    assert other.aborted == ["Tensor.item() was called during capture"]
    assert not capture_guard.any_capture_underway()
    assert capture_guard.capture_of_stream(0, 0x1000) is None
    capture_guard._check_not_capturing("Tensor.item()")  # usable again


def test_guard_and_captures_of_other_threads():
    cap = FakeCapture(stream_handle=0x3000)
    registered, release = threading.Event(), threading.Event()

    def capturing_thread():
        capture_guard.register(cap)
        registered.set()
        release.wait(10)
        capture_guard.unregister(cap)

    t = threading.Thread(target=capturing_thread)
    t.start()
    try:
        assert registered.wait(10)
        assert capture_guard.thread_captures() == []
        # Host work of this thread is legal: thread-local capture mode.
        capture_guard._check_not_capturing("Tensor.cpu()")
        # Waiting on the stream the other thread captures is not, and must not abort it.
        with pytest.raises(cuda.StreamCaptureError, match="another thread"):
            capture_guard._check_not_capturing("Stream.synchronize()", 0, 0x3000)
        assert cap.aborted == []
    finally:
        release.set()
        t.join()
    assert not capture_guard.any_capture_underway()


def test_register_rejects_second_capture_of_a_stream(fake_capture):
    with pytest.raises(RuntimeError, match="already being captured"):
        capture_guard.register(FakeCapture())
    capture_guard.unregister(FakeCapture())  # unknown capture: no-op
    assert capture_guard.capture_of_stream(0, 0x1000) is fake_capture
