"""bench/results_file.py: the results-file name and schema every GPU benchmark shares."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import cutegrad_version, gpu_result, gpu_slug, write_result  # noqa: E402


class _FakeCuda:
    @staticmethod
    def get_device_name(i):
        return "NVIDIA H200"


class _FakeTorch:
    __version__ = "9.9"
    cuda = _FakeCuda

    class version:
        cuda = "13.0"


def test_slug_and_written_schema(tmp_path, monkeypatch):
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    import bench.results_file as rf
    monkeypatch.setattr(rf, "driver_version", lambda: "580.1")
    result = gpu_result("copies", _FakeTorch, [{"name": "x", "ratio": 1.5}], ["--reps", "3"], note="n")
    path = write_result(result, tmp_path, "copies")
    assert Path(path).name == "copies-nvidia-h200.json"
    got = json.loads(Path(path).read_text())
    assert got["device"] == "NVIDIA H200" and got["driver"] == "580.1" and got["note"] == "n"
    assert got["command"] == "python -m bench.copies --reps 3" and got["rows"] == [{"name": "x", "ratio": 1.5}]
    assert got["versions"] == {"cutegrad": cutegrad_version(), "python": got["versions"]["python"],
                               "torch": "9.9", "cuda": "13.0"}
    assert got["date"].endswith("+00:00")
