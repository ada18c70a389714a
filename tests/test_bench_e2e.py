"""bench/e2e.py's machinery on the CPU: argument parsing, statistics, the profiler-trace
reduction, the allocator clock, the batches, the sessions' steps, `measure` with the CUDA
calls stood in for, and rendering the table and chart from a synthetic results file.

The GPU measurement itself runs only on a device (`python -m bench.e2e`).
"""
import json
import math
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # bench/ is a package at the repository root
    sys.path.insert(0, _ROOT)

from bench import e2e  # noqa: E402
from cutegrad.allocator import CachingAllocator, SimulatedMemory  # noqa: E402
from cutegrad.models import PRESETS  # noqa: E402


# --- command line ----------------------------------------------------------------------------
def test_defaults_cover_every_workload_and_mode():
    a = e2e.parse_args([])
    assert a.workloads == list(e2e.WORKLOADS) == ["reverse", "vit", "minigpt", "gpt2-small"]
    assert a.modes == list(e2e.MODES) and len(a.modes) == 9
    assert a.steps >= 30 and a.render is None and a.batch_size == {}


def test_filters_steps_and_batch_overrides():
    a = e2e.parse_args(["--workloads", "reverse", "--steps", "5", "--modes",
                        "torch-eager-bf16,cutegrad-graphed-bf16,torch-eager-bf16", "--batch-size", "gpt2-small=4",
                        "--budget-s", "60"])
    assert a.workloads == ["reverse"] and a.steps == 5 and a.budget_s == 60
    assert a.modes == ["torch-eager-bf16", "cutegrad-graphed-bf16"]  # order kept, duplicates dropped
    assert a.batch_size == {"gpt2-small": 4}


@pytest.mark.parametrize("argv, message", [
    (["--workloads", "resnet"], "unknown workload resnet"),
    (["--modes", "cutegrad-eager-fp16"], "unknown mode cutegrad-eager-fp16"),
    (["--workloads", ","], "unknown workload"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--batch-size", "vit"], "WORKLOAD=N"),
    (["--batch-size", "vit=0"], "WORKLOAD=N"),
    (["--batch-size", "bert=8"], "WORKLOAD=N"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_slow_modes_time_fewer_steps_but_never_fewer_than_thirty():
    a = e2e.parse_args(["--steps", "50", "--mode-cap-s", "20"])
    assert e2e.timed_steps(a, 0.1) == 50  # 5 s
    assert e2e.timed_steps(a, 0.5) == 40  # 25 s at 50 steps: 40 fit in 20 s
    assert e2e.timed_steps(a, 3.0) == 30
    assert e2e.timed_steps(e2e.parse_args(["--steps", "5", "--mode-cap-s", "1"]), 3.0) == 5  # a smoke run


def test_without_a_gpu_the_measurement_says_so(tmp_path):
    torch = pytest.importorskip("torch")
    import cutegrad
    if torch.cuda.is_available() and cutegrad.cuda.is_available():
        pytest.skip("a GPU is here: this would run the benchmark")
    with pytest.raises(SystemExit, match="measures on a CUDA GPU"):
        e2e.main(["--workloads", "reverse", "--steps", "5", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_side_measurements_shrink_for_slow_steps():
    a = e2e.parse_args(["--mode-cap-s", "20"])
    assert e2e.side_steps(10, a, 0.01) == 10
    assert e2e.side_steps(10, a, 1.0) == 5  # a quarter of 20 s
    assert e2e.side_steps(3, a, 30.0) == 1


def test_every_mode_runs_in_a_set_order():
    assert sorted(e2e.RUN_ORDER) == sorted(e2e.MODES)
    for a, b in e2e.PAIRS:
        assert a in e2e.MODES and b in e2e.MODES


def test_mode_names_start_with_their_framework():
    for mode, (framework, execution, precision) in e2e.MODES.items():
        assert e2e.framework_of(mode) == framework and mode == f"{framework}-{execution}-{precision}"


# --- statistics and the trace ----------------------------------------------------------------
def test_summary_matches_numpy_percentiles(rng):
    values = list(rng.standard_normal(37) + 5)
    s = e2e.summary(values, digits=10)
    assert s["n"] == 37
    for key, q in (("median", 50), ("p10", 10), ("p90", 90)):
        assert math.isclose(s[key], float(np.percentile(values, q)), rel_tol=1e-9)
    assert e2e.summary([2.5]) == {"median": 2.5, "p10": 2.5, "p90": 2.5, "n": 1}


def _trace():
    win = {"ph": "X", "cat": "user_annotation", "name": e2e.WINDOW, "ts": 1000.0, "dur": 500.0}
    ev = [win,
          {"ph": "X", "cat": "kernel", "name": "k_before", "ts": 900.0, "dur": 50.0},  # outside: not counted
          {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1010.0, "dur": 40.0},
          {"ph": "X", "cat": "kernel", "name": "add", "ts": 1100.0, "dur": 20.0},
          {"ph": "X", "cat": "kernel", "name": "adamw", "ts": 1400.0, "dur": 60.0},
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 1005.0, "dur": 3.0},
          {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 1006.0, "dur": 1.0},
          {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 1001.0, "dur": 2.0},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1002.0, "dur": 2.0},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 1450.0, "dur": 2.0},
          {"ph": "i", "cat": "kernel", "name": "instant, not a duration event", "ts": 1200.0},
          {"ph": "X", "cat": "kernel", "name": "k_after", "ts": 1600.0, "dur": 5.0}]  # outside
    return {"traceEvents": ev}


def test_kernel_stats_counts_what_lies_in_the_window():
    s = e2e.kernel_stats(_trace(), steps=2)
    assert s["window_found"] and s["profiled_steps"] == 2
    assert s["kernels_per_step"] == 1.5  # gemm, add, adamw over 2 steps
    assert math.isclose(s["kernel_ms_per_step"], (40 + 20 + 60) / 1e3 / 2)
    assert s["memcpy_per_step"] == 0.5 and s["memset_per_step"] == 0.5
    assert s["launch_calls_per_step"] == 1.0  # cuLaunchKernel + cudaLaunchKernel, not the sync
    # the profile: every device activity in the window, most expensive first, per step
    assert s["top_kernels"] == [["adamw", 0.5, 0.03], ["gemm", 0.5, 0.02], ["add", 0.5, 0.01],
                                ["Memcpy DtoD", 0.5, 0.0015], ["Memset", 0.5, 0.0005]]


def test_kernel_stats_without_window_or_api_events():
    t = {"traceEvents": [e for e in _trace()["traceEvents"]
                         if e.get("cat") not in ("user_annotation", "cuda_runtime", "cuda_driver")]}
    s = e2e.kernel_stats(t, steps=1)
    assert not s["window_found"] and s["kernels_per_step"] == 5  # every kernel duration event
    assert s["launch_calls_per_step"] is None


# --- allocator clock -------------------------------------------------------------------------
def test_allocator_clock_times_every_call_and_restores_the_allocator():
    alloc = CachingAllocator(SimulatedMemory())
    assert "malloc" not in vars(alloc)
    with e2e.AllocatorClock(alloc) as clock:
        blocks = [alloc.malloc(n, 0) for n in (512, 4096, 3 << 20)]
        for b in blocks:
            alloc.free(b)
    assert (clock.mallocs, clock.frees) == (3, 3) and clock.ns > 0
    assert "malloc" not in vars(alloc) and "free" not in vars(alloc)  # the class's methods again
    alloc.free(alloc.malloc(100, 0))
    assert clock.mallocs == 3
    alloc.check_invariants()


def test_allocator_clock_counts_a_failing_call_and_lets_the_error_through():
    alloc = CachingAllocator(SimulatedMemory())
    with e2e.AllocatorClock(alloc) as clock:
        with pytest.raises(Exception):
            alloc.free(object())
    assert clock.frees == 1 and "free" not in vars(alloc)


# --- data ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["reverse", "vit"])
def test_batches_have_the_preset_shapes(name):
    preset = replace(PRESETS[name], batch_size=4)
    batches, desc = e2e.workload_batches(name, preset, 2)
    assert len(batches) == 2 and "synthetic random" not in desc
    x, y = batches[0]
    if name == "vit":
        assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and y.shape == (4,)
    else:
        assert x.shape == y.shape == (4, 64) and x.max() < 36
    assert not np.array_equal(batches[0][0], batches[1][0])


def test_text_batches_use_the_corpus_and_fall_back_to_synthetic(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTEGRAD_CACHE", str(tmp_path))
    preset = replace(PRESETS["minigpt"], batch_size=3)
    from cutegrad import data as D
    small = D.Corpus("the quick brown fox jumps over the lazy dog. " * 200, "embedded", "test", "test corpus")
    monkeypatch.setattr(D, "resolve_corpus", lambda **kw: small)
    batches, desc = e2e.workload_batches("minigpt", preset, 2)
    x, y = batches[0]
    assert x.shape == y.shape == (3, 128) and "test corpus" in desc and "BPE vocab" in desc
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # next-token targets

    def broken(**kw):
        raise OSError("disk gone")
    monkeypatch.setattr(D, "resolve_corpus", broken)
    batches, desc = e2e.workload_batches("gpt2-small", replace(PRESETS["gpt2-small"], batch_size=2), 2)
    assert "synthetic random batches" in desc and "disk gone" in desc
    assert batches[0][0].shape == (2, 1024) and batches[0][0].max() < 50304


# --- sessions and measure on the CPU ---------------------------------------------------------
class _FakeEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def _fake_cuda_torch(torch):
    """torch with .cuda replaced by host-clock stand-ins, for measure() on the CPU."""
    calls = {"n": 0}

    def memory_stats():
        calls["n"] += 7
        return {"allocation.all.allocated": calls["n"]}
    cuda = types.SimpleNamespace(Event=_FakeEvent, is_available=lambda: False, memory_stats=memory_stats,
                                 current_device=lambda: 0)
    return types.SimpleNamespace(cuda=cuda)


def test_sessions_start_from_the_same_weights_and_measure_runs(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import cutegrad
    from bench.torch_models import cutegrad_weights
    from cutegrad import train as T

    preset = replace(PRESETS["minigpt"], model=replace(PRESETS["minigpt"].model, vocab_size=64, block_size=16,
                                                       n_layer=1, n_head=2, n_embd=32, dropout=0.0),
                     batch_size=2)
    rng = np.random.default_rng(0)
    # One batch repeated: the loss on it must fall as the steps fit it.
    batches = [(rng.integers(0, 64, (2, 16)), rng.integers(0, 64, (2, 16)))] * e2e.N_BATCHES
    cutegrad.manual_seed(0)
    cpu_model = T.build_model(preset.model)
    weights = cutegrad_weights(cpu_model)
    cg = e2e.cutegrad_session(cpu_model, preset, batches, "eager", "fp32", device="cpu")
    th = e2e.torch_session(torch, weights, preset, batches, "eager", "fp32", device="cpu")
    # Identical weights and batch: the first steps' losses agree; the step leaves cpu_model untouched.
    assert math.isclose(cg.first_loss, th.first_loss, rel_tol=1e-5)
    assert math.isclose(cg.first_loss, math.log(64), rel_tol=0.1)
    assert np.array_equal(cpu_model.tok_emb.weight.detach().numpy(), weights["tok_emb.weight"].numpy())
    assert "AdamW(fused=True)" in th.notes

    args = e2e.parse_args(["--steps", "3", "--warmup", "1", "--host-steps", "2", "--profile-steps", "1",
                           "--alloc-steps", "2"])
    out = e2e.measure(_fake_cuda_torch(torch), th, "torch", args, sync=lambda: None)
    assert out["ms_per_step"]["n"] == 3 and out["ms_per_step"]["median"] > 0
    assert out["host_ms_per_step"]["n"] == 2 and out["steps_run"] == 1 + 3 + 2 + 1 + 2
    assert out["kernels_per_step"] == 0 and out["window_found"]  # no GPU: no kernels, but the window is there
    assert out["allocs_per_step"] == 3.5 and out["allocator_ms_per_step"] is None
    assert math.isfinite(out["loss"]) and out["loss"] < th.first_loss  # it trained
    cg.close()
    th.close()


# --- results and rendering -------------------------------------------------------------------
def _mode(ms, kernels=100, kernel_ms=None, host=1.0, alloc=0.2, loss=2.5):
    return {"ms_per_step": {"median": ms, "p10": ms * 0.9, "p90": ms * 1.1, "n": 30},
            "kernels_per_step": kernels, "kernel_ms_per_step": kernel_ms if kernel_ms is not None else ms / 2,
            "launch_calls_per_step": kernels, "host_ms_per_step": {"median": host, "p10": host, "p90": host, "n": 10},
            "allocator_ms_per_step": alloc, "allocs_per_step": 40.0, "loss": loss}


def synthetic_result():
    modes = list(e2e.MODES)
    w = {
        "reverse": {"batch_size": 64, "parameters": 412_000, "data": "reversal task", "modes": {
            "cutegrad-eager-fp32": _mode(3.0), "cutegrad-eager-bf16": _mode(2.8),
            "cutegrad-graphed-fp32": _mode(0.9), "cutegrad-graphed-bf16": _mode(0.8),
            "torch-eager-fp32": _mode(4.0, alloc=None), "torch-eager-bf16": _mode(4.2, alloc=None),
            "torch-compile-bf16": {"error": "RuntimeError: compile failed", "traceback": "..."},
            "torch-cudagraph-bf16": _mode(1.0, alloc=None)}},
        "gpt2-small": {"batch_size": 4, "batch_note": "batch 4 (preset: 8), --batch-size", "parameters": 124_000_000,
                       "data": "tiny Shakespeare", "modes": {
                           "cutegrad-eager-bf16": _mode(250.0), "torch-compile-bf16": _mode(200.0, alloc=None),
                           "torch-cudagraph-bf16": {"skipped": "time budget: 460 s > --budget-s 450"}}},
        "vit": {"batch_size": 256, "modes": {}, "error": "setup: OSError: no data"},
    }
    result = {"device": "NVIDIA H200", "driver": "580.1 (CUDA driver API 13.0)",
              "versions": {"cutegrad": "0.1.0", "python": "3.12.3", "torch": "2.11.0", "cuda": "13.0"},
              "date": "2026-11-22T07:00:00+00:00", "command": "python -m bench.e2e",
              "settings": {"steps": 50}, "modes": {m: {} for m in modes}, "workloads": w}
    w["reverse"]["modes"]["cutegrad-graphed-bf16"]["top_kernels"] = [["gemm_bf16", 4.0, 0.3], ["adamw", 1.0, 0.1]]
    w["reverse"]["modes"]["torch-cudagraph-bf16"]["top_kernels"] = [["sm90_xmma_gemm_" + "x" * 100, 4.0, 0.5]]
    result["rows"] = e2e.comparison_rows(result)
    return result


def test_comparison_rows_follow_the_results_schema():
    rows = synthetic_result()["rows"]
    by_name = {r["name"]: r for r in rows}
    best = by_name["reverse: best cutegrad (cutegrad-graphed-bf16) vs best PyTorch"]
    assert best["baseline_name"] == "torch-cudagraph-bf16" and best["ratio"] == round(1.0 / 0.8, 4)
    assert by_name["reverse: cutegrad-eager-fp32"]["ratio"] == round(4.0 / 3.0, 4)
    assert by_name["gpt2-small: best cutegrad (cutegrad-eager-bf16) vs best PyTorch"]["ratio"] == 0.8
    assert not any(r["name"].startswith("vit") for r in rows)  # nothing measured, no row
    for r in rows:
        assert set(r) == {"name", "unit", "cutegrad", "baseline", "baseline_name", "ratio"} and r["unit"] == "ms/step"


def test_render_writes_table_and_chart_from_json_alone(tmp_path, capsys):
    path = tmp_path / "e2e-nvidia-h200.json"
    path.write_text(json.dumps(synthetic_result()))
    assert e2e.main(["--render", str(path)]) == 0
    md = (tmp_path / "e2e-nvidia-h200.md").read_text()
    assert "on NVIDIA H200" in md and "wrote" in capsys.readouterr().out
    header = next(line for line in md.splitlines() if line.startswith("| workload | cutegrad-eager-fp32"))
    assert header.count("|") == len(e2e.MODES) + 5
    row = next(line for line in md.splitlines() if line.startswith("| reverse | 3.000"))
    assert "| error |" in row and "cutegrad-graphed-bf16 | torch-cudagraph-bf16 | 1.250 |" in row
    assert "| gpt2-small | — | 250.0 |" in md and "skipped" in md
    assert "- reverse torch-compile-bf16: RuntimeError: compile failed" in md
    assert "- vit: setup: OSError: no data" in md and "batch 4 (preset: 8)" in md
    assert "| reverse | torch-eager-fp32 | 4.000 | 2.000 | 100 | 100 | 1.000 | n/a | 40.0 | 2.5000 |" in md
    assert "| reverse | cutegrad-graphed-bf16 | 0.800 | 0.400 | 100 | 100 | 1.000 | 0.200 | 40.0 | 2.5000 |" in md
    # the profile section: our graphed step's top kernels beside PyTorch's fastest mode's, long names cut
    assert "### reverse: cutegrad-graphed-bf16 (0.4 kernel-ms) vs torch-cudagraph-bf16 (0.5 kernel-ms)" in md
    assert f"| 1 | `gemm_bf16` | 4.0 | 0.300 | `sm90_xmma_gemm_{'x' * 72}...` | 4.0 | 0.500 |" in md
    assert "| 2 | `adamw` | 1.0 | 0.100 |  | | |" in md
    assert "### gpt2-small" not in md  # no profile there
    try:
        import matplotlib  # noqa: F401  (only whether it is there matters)
    except ImportError:
        assert not (tmp_path / "e2e-nvidia-h200.png").exists()
    else:
        png = (tmp_path / "e2e-nvidia-h200.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_merge_keeps_what_this_run_did_not_measure(tmp_path):
    old = synthetic_result()
    new = synthetic_result()
    del new["workloads"]["gpt2-small"]
    new["workloads"]["reverse"]["modes"] = {"torch-compile-bf16": _mode(0.7, alloc=None)}
    new["date"], new["command"] = "2026-11-22T08:00:00+00:00", "python -m bench.e2e --modes torch-compile-bf16"
    path = e2e.write_results(new, str(tmp_path), merge_with=old)
    merged = json.loads(Path(path).read_text())
    rev = merged["workloads"]["reverse"]["modes"]
    assert rev["torch-compile-bf16"]["ms_per_step"]["median"] == 0.7 and "from_run" not in rev["torch-compile-bf16"]
    assert rev["cutegrad-graphed-bf16"]["from_run"] == {"date": old["date"], "command": old["command"]}
    assert merged["workloads"]["gpt2-small"]["modes"]["cutegrad-eager-bf16"]["from_run"]["date"] == old["date"]
    assert merged["merged_runs"] == [{"date": old["date"], "command": old["command"]}]
    best = next(r for r in merged["rows"] if r["name"].startswith("reverse: best"))
    assert best["baseline_name"] == "torch-compile-bf16" and best["ratio"] == round(0.7 / 0.8, 4)
    md = Path(e2e.render(path)[0]).read_text()
    assert "| reverse | 3.000* |" in md and "| 0.700 |" in md and "earlier run merged" in md


def test_result_path_names_the_gpu(tmp_path):
    assert e2e.result_path(str(tmp_path), "NVIDIA H200") == str(tmp_path / "e2e-nvidia-h200.json")
    assert e2e.result_path("r", "NVIDIA H100 80GB HBM3").endswith("e2e-nvidia-h100-80gb-hbm3.json")
