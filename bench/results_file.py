"""The results file a GPU benchmark writes: bench/results/<name>-<gpu>.json.

DESIGN.md's schema: device, driver, versions (cutegrad, python, torch, cuda),
date (UTC), the command that reproduces it, and the benchmark's rows.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys


def gpu_slug(name):
    """'NVIDIA H200' -> 'nvidia-h200': the device part of a results file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def driver_version():
    """The NVIDIA driver version (nvidia-smi), else the CUDA driver API version."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            return smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass  # the API version below still identifies the driver generation
    from cuda.bindings import driver as cu
    api = cu.cuDriverGetVersion()[1]
    return f"CUDA driver API {api // 1000}.{api % 1000 // 10}"


def cutegrad_version():
    try:
        return importlib.metadata.version("cutegrad")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not pip-installed
        import tomllib

        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"),
                  "rb") as f:
            return tomllib.load(f)["project"]["version"] + "+source"


def gpu_result(module, torch, rows, argv=None, **extra):
    """The results dict of `python -m bench.<module>` on torch's current GPU."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "device": torch.cuda.get_device_name(0),
        "driver": driver_version(),
        "versions": {"cutegrad": cutegrad_version(), "python": platform.python_version(),
                     "torch": torch.__version__, "cuda": torch.version.cuda},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m bench.{module} " + " ".join(args),
        **extra,
        "rows": rows,
    }


def write_result(result, out, name):
    """Write `result` to <out>/<name>-<gpu slug>.json and return the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}-{gpu_slug(result['device'])}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
    return path
