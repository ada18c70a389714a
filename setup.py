"""Build of cutegrad._C (project metadata lives in pyproject.toml).

build_ext does three things before setuptools compiles and links the module:
1. runs kernels/cute/aot.py: every CuTeDSL specialization -> name.h + name.o
   (cached under build/aot/cache by a hash of kernel source + spec);
2. compiles kernels/cuda/*.cu with nvcc (SASS for each configured target plus
   compute_80 PTX so other GPUs run the CUDA C++ kernels), cached under
   build/cuda-cache by a hash of sources + flags;
3. adds nanobind's sources, the generated kernel table and all objects to the
   extension, linked against libcuda_dialect_runtime_static.a (from the
   nvidia-cutlass-dsl-libs-cu13 wheel) and the static CUDA runtime.

Targets come from CUTEGRAD_CUDA_ARCHS (default "sm_90a", comma-separated).
The static runtime opens the driver lazily, so the module imports on a
machine with no GPU; kernel calls then raise.
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_SRC = os.path.join(ROOT, "kernels", "cuda")


def cuda_archs():
    raw = os.environ.get("CUTEGRAD_CUDA_ARCHS", "sm_90a")
    return [a.strip() for a in raw.replace(";", ",").split(",") if a.strip()]


def _pip_cuda_roots():
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [os.path.join(p, sub) for p in spec.submodule_search_locations for sub in ("cu13", "cuda_nvcc", "cuda_runtime")]


def find_cuda():
    """(nvcc, include dirs, path of libcudart_static.a): a local toolkit first,
    else the pip wheels (cuda-toolkit[nvcc,cudart]) in the build environment."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path))))
    roots += ["/usr/local/cuda"] + _pip_cuda_roots()
    nvcc = includes = cudart = None
    for root in [r for r in roots if r and os.path.isdir(r)]:
        nvcc = nvcc or (os.path.join(root, "bin", "nvcc") if os.path.exists(os.path.join(root, "bin", "nvcc")) else None)
        for inc in (os.path.join(root, "include"), os.path.join(root, "targets", "x86_64-linux", "include")):
            if includes is None and os.path.exists(os.path.join(inc, "cuda_runtime.h")):
                includes = [inc]
        if cudart is None:
            hits = glob.glob(os.path.join(root, "**", "libcudart_static.a"), recursive=True)
            cudart = hits[0] if hits else None
    if not (nvcc and includes and cudart):
        raise RuntimeError(
            "cutegrad build: CUDA toolkit not found (need nvcc, cuda_runtime.h, libcudart_static.a). "
            "Set CUDA_HOME or `pip install \"cuda-toolkit[nvcc,cudart]\"` into the build environment."
        )
    return nvcc, includes, cudart


def dsl_runtime_lib():
    spec = importlib.util.find_spec("nvidia_cutlass_dsl")
    for base in spec.submodule_search_locations if spec else []:
        for cu in ("cu13", "cu12"):
            path = os.path.join(base, cu, "lib", "libcuda_dialect_runtime_static.a")
            if os.path.exists(path):
                return path
    raise RuntimeError("cutegrad build: nvidia-cutlass-dsl-libs-cu13 (libcuda_dialect_runtime_static.a) is not installed")


def nvcc_gencode(archs):
    flags = []
    for arch in archs:
        num = arch[3:]
        flags += ["-gencode", f"arch=compute_{num},code={arch}"]
    return flags + ["-gencode", "arch=compute_80,code=compute_80"]


def write_op_codes():
    """kernels/cuda/op_codes.h from frontend/ops/codes.py, the one source of the kernel op codes
    (run as a script: the build does not import cutegrad)."""
    subprocess.check_call([sys.executable, os.path.join(ROOT, "frontend", "ops", "codes.py"),
                           os.path.join(CUDA_SRC, "op_codes.h")])


def compile_cuda(nvcc, archs):
    """nvcc objects of kernels/cuda/*.cu, cached by sources + flags; returns (objects, number compiled)."""
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr"] + nvcc_gencode(archs)
    headers = sorted(glob.glob(os.path.join(CUDA_SRC, "*.h")))
    cache = os.path.join(ROOT, "build", "cuda-cache")
    os.makedirs(cache, exist_ok=True)
    objects, compiled = [], 0
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    for src in sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu"))):
        h = hashlib.sha256()
        for path in [src] + headers:
            with open(path, "rb") as f:
                h.update(f.read())
        h.update(" ".join(flags).encode() + version.encode())
        obj = os.path.join(cache, f"{os.path.basename(src)}.{h.hexdigest()[:20]}.o")
        if not os.path.exists(obj):
            subprocess.check_call([nvcc, *flags, "-I", CUDA_SRC, "-c", src, "-o", obj + ".tmp"])
            os.replace(obj + ".tmp", obj)
            compiled += 1
        objects.append(obj)
    print(f"[nvcc] {compiled} compiled, {len(objects) - compiled} from cache", flush=True)
    return objects, compiled


class BuildExt(build_ext):
    def build_extensions(self):
        archs = cuda_archs()
        aot_out = os.path.join(ROOT, "build", "aot")
        subprocess.check_call(
            [sys.executable, os.path.join(ROOT, "kernels", "cute", "aot.py"), "--out", aot_out, "--archs", ",".join(archs)]
        )
        with open(os.path.join(aot_out, "manifest.json")) as f:
            manifest = json.load(f)
        nvcc, cuda_includes, cudart = find_cuda()
        write_op_codes()
        cu_objects, _ = compile_cuda(nvcc, archs)

        import nanobind

        nb_dir = os.path.dirname(nanobind.__file__)
        include_dirs = [
            CUDA_SRC,
            nanobind.include_dir(),
            os.path.join(nb_dir, "ext", "robin_map", "include"),
        ] + cuda_includes
        cxx_flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing"]
        host_objects = self.compile_host(
            manifest["sources"] + [os.path.join(nanobind.source_dir(), "nb_combined.cpp")], include_dirs, cxx_flags
        )
        for ext in self.extensions:
            ext.include_dirs += include_dirs
            ext.extra_compile_args += cxx_flags
            ext.extra_objects += host_objects + manifest["objects"] + cu_objects
            ext.extra_link_args += [dsl_runtime_lib(), cudart, "-ldl", "-lrt", "-lpthread"]
        super().build_extensions()

    def compile_host(self, sources, include_dirs, flags):
        """C++ sources other than module.cpp (nanobind, generated kernel tables),
        cached by content + flags + Python ABI: setuptools itself would rebuild them."""
        cache = os.path.join(ROOT, "build", "host-cache")
        os.makedirs(cache, exist_ok=True)
        abi = sysconfig.get_config_var("EXT_SUFFIX") + sysconfig.get_paths()["include"]
        objects, compiled = [], 0
        for src in sources:
            h = hashlib.sha256()
            with open(src, "rb") as f:
                h.update(f.read())
            for d in include_dirs:
                for path in sorted(glob.glob(os.path.join(d, "*.h"))):
                    with open(path, "rb") as f:
                        h.update(f.read())
            h.update(" ".join(flags + include_dirs).encode() + abi.encode())
            obj = os.path.join(cache, f"{os.path.basename(src)}.{h.hexdigest()[:20]}.o")
            if not os.path.exists(obj):
                tmp_dir = os.path.join(cache, "tmp")
                (built,) = self.compiler.compile([src], output_dir=tmp_dir, include_dirs=include_dirs, extra_postargs=flags)
                os.replace(built, obj)
                compiled += 1
            objects.append(obj)
        print(f"[c++] {compiled} compiled, {len(objects) - compiled} from cache", flush=True)
        return objects


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    setup(
        ext_modules=[
            Extension(
                "cutegrad._C",
                # module.cpp defines the module; other *.cpp files add bindings through its register_ops hook.
                sources=sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CUDA_SRC, "*.cpp"))),
            )
        ],
        cmdclass={"build_ext": BuildExt},
    )
