"""The built extension, read without a GPU: every sm_90a GEMM specialization is
tensor-core code (HGMMA) with no local memory beyond the budget, and an
unchanged rebuild compiles nothing."""

import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_DIR = os.path.join(ROOT, "build", "aot")
MANIFEST = os.path.join(AOT_DIR, "manifest.json")
# Bytes of local memory (register spills, stack arrays) a kernel may use: the
# GEMMs keep the whole accumulator in registers, so none.
LOCAL_MEMORY_BUDGET = 0
EM_CUDA = 190

needs_build = pytest.mark.skipif(not os.path.exists(MANIFEST), reason="no build/aot: run `pip install -e .` first")


def cuda_tool(name):
    """cuobjdump / nvdisasm from the toolkit or the PyPI wheels (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm)."""
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")]
    spec = importlib.util.find_spec("nvidia")
    dirs += [os.path.join(p, "cu13", "bin") for p in (spec.submodule_search_locations if spec else [])]
    for d in dirs:
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    found = shutil.which(name)
    assert found, f"{name} not found: install the CUDA toolkit or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`"
    return found


def embedded_cubins(blob):
    """CUDA ELF images embedded in a host object (export_to_c stores the cubin as data)."""
    out, at = [], blob.find(b"\x7fELF", 1)
    while at > 0:
        if struct.unpack_from("<H", blob, at + 18)[0] == EM_CUDA:
            phoff = struct.unpack_from("<Q", blob, at + 0x20)[0]
            shoff = struct.unpack_from("<Q", blob, at + 0x28)[0]
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", blob, at + 0x36)
            out.append(blob[at : at + max(phoff + phentsize * phnum, shoff + shentsize * shnum)])
        at = blob.find(b"\x7fELF", at + 1)
    return out


def run_tool(args):
    cuobjdump = cuda_tool("cuobjdump")
    env = dict(os.environ, PATH=os.path.dirname(cuda_tool("nvdisasm")) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run([cuobjdump, *args], capture_output=True, text=True, env=env, check=True).stdout


def unelected_tx_arrivals(listing):
    """SASS lines of mbarrier arrivals with a transaction count that no predicate guards.
    A TMA barrier expects one arrival from one elected thread; an arrival by a whole warp
    overflows its count, which faults on the device (the short attention kernel did this)."""
    return [line.strip() for line in listing.splitlines()
            if "SYNCS.ARRIVE.TRANS64" in line and not re.search(r"/\*[0-9a-f]+\*/\s+@", line)]


def local_bytes(res_usage):
    return [int(x) for x in re.findall(r"LOCAL:(\d+)", res_usage)]


def sass_listings(objects):
    """(object name, resource usage + SASS of its one embedded cubin) for each exported CuTeDSL object."""
    with tempfile.TemporaryDirectory() as tmp:

        def inspect(obj):
            cubins = embedded_cubins(open(obj, "rb").read())
            assert len(cubins) == 1, f"{obj}: expected one embedded cubin, found {len(cubins)}"
            path = os.path.join(tmp, os.path.basename(obj) + ".cubin")
            with open(path, "wb") as f:
                f.write(cubins[0])
            return os.path.basename(obj), run_tool(["-res-usage", "-sass", path])

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return list(pool.map(inspect, objects))


@needs_build
def test_every_sm90_gemm_specialization_uses_hgmma_and_no_local_memory():
    manifest = json.load(open(MANIFEST))
    objects = [o for o in manifest["objects"] if "gemm_sm_90a_" in os.path.basename(o)]
    assert objects, "no sm_90a GEMM objects in the build"
    for name, listing in sass_listings(objects):
        assert "HGMMA" in listing, f"{name}: no HGMMA instruction in its SASS"
        usage = local_bytes(listing)
        assert usage and max(usage) <= LOCAL_MEMORY_BUDGET, f"{name}: local memory {usage}"
        assert not unelected_tx_arrivals(listing), f"{name}: {unelected_tx_arrivals(listing)}"


@needs_build
def test_narrow_gemm_tiles_store_d_without_tma():
    """The 128x16/32/64 head tiles: HGMMA mainloop fed by TMA loads, D written with plain
    predicated global stores (no TMA store: 10- or 36-wide rows are not 16-byte multiples)."""
    manifest = json.load(open(MANIFEST))
    objects = [o for o in manifest["objects"] if re.search(r"gemm_sm_90a_.*_128x(16|32|64)_", os.path.basename(o))]
    assert len(objects) == 12, objects
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(embedded_cubins(open(obj, "rb").read())[0])
            listing = run_tool(["-sass", path])
            name = os.path.basename(obj)
            assert "HGMMA" in listing and "UTMALDG" in listing, name
            assert "UTMASTG" not in listing and "STG.E" in listing, name


@needs_build
def test_bias_gelu_aux_stores_the_preactivation_by_tma_like_d():
    """bias_gelu_aux writes aux the way it writes D: staged through shared memory and TMA-stored
    with a descriptor of its own.  Against the bias object of the same dtypes and tile (the same
    slices of D): twice its TMA stores, one more descriptor prefetch, and no store from
    registers to global memory left (aux was written with predicated 2-byte stores before)."""
    manifest = json.load(open(MANIFEST))
    by_name = {os.path.basename(o)[: -len(".o")]: o for o in manifest["objects"]}
    aux_names = sorted(n for n in by_name if n.startswith("gemm_sm_90a_") and n.endswith("_bias_gelu_aux"))
    assert len(aux_names) == 7, aux_names
    pairs = [(n, n[: -len("_gelu_aux")]) for n in aux_names]
    listings = dict(sass_listings([by_name[n] for pair in pairs for n in pair]))
    for aux_name, bias_name in pairs:
        aux, bias = listings[aux_name + ".o"], listings[bias_name + ".o"]
        assert "HGMMA" in aux, aux_name
        stores = aux.count("UTMASTG")
        assert stores > 0 and stores == 2 * bias.count("UTMASTG"), (aux_name, stores, bias.count("UTMASTG"))
        assert aux.count("UTMACCTL.PF") == bias.count("UTMACCTL.PF") + 1, aux_name
        assert not re.search(r"\bSTG\.", aux), f"{aux_name}: global stores from registers remain"
        assert local_bytes(aux) == [0], f"{aux_name}: local memory {local_bytes(aux)}"
        assert not unelected_tx_arrivals(aux), f"{aux_name}: {unelected_tx_arrivals(aux)}"


@needs_build
def test_tf32_gemm_specializations_issue_tf32_wgmma():
    """fp32 operands at the "high" precision: every tf32 specialization's tensor-core instructions
    are HGMMA ... F32.TF32 with K = 8 (no bf16/fp16 HGMMA, no FFMA mainloop in their place)."""
    manifest = json.load(open(MANIFEST))
    objects = [o for o in manifest["objects"] if "gemm_sm_90a_tf32_" in os.path.basename(o)]
    assert len(objects) == 9, objects
    for name, listing in sass_listings(objects):
        hgmma = set(re.findall(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32\.(\w+)", listing))
        assert hgmma, f"{name}: no HGMMA"
        tile_n = re.search(r"_128x(\d+)_", name).group(1)
        assert hgmma == {("64", tile_n, "8", "TF32")}, f"{name}: {hgmma}"


@needs_build
def test_cuda_cpp_kernels_in_extension_use_no_local_memory():
    from cutegrad import _C

    usage = run_tool(["-res-usage", _C.__file__])
    assert "gemm_simt_kernel" in usage
    assert max(local_bytes(usage)) <= LOCAL_MEMORY_BUDGET, usage


@needs_build
def test_unchanged_rebuild_compiles_no_kernel():
    archs = os.environ.get("CUTEGRAD_CUDA_ARCHS", "sm_90a")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "cute", "aot.py"), "--out", AOT_DIR,
                          "--archs", archs], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\[aot\] 0 compiled, \d+ from cache", out), out
    sys.path.insert(0, ROOT)
    try:
        import setup as build_script
    finally:
        sys.path.remove(ROOT)
    try:
        nvcc, _, _ = build_script.find_cuda()
    except RuntimeError as exc:  # the toolkit lived only in the isolated build environment
        pytest.skip(f"nvcc half of the check needs a CUDA toolkit in this environment: {exc}")
    objects, compiled = build_script.compile_cuda(nvcc, build_script.cuda_archs())
    assert compiled == 0 and objects


def test_a_shared_helper_module_is_part_of_its_families_cache_keys(monkeypatch):
    """kernels/cute/philox.py is no family of its own; a change to it must recompile the
    families that import it (attention forward and backward, norms) and only those."""
    sys.path.insert(0, os.path.join(ROOT, "kernels", "cute"))
    try:
        import aot
    finally:
        sys.path.pop(0)
    assert "philox" not in aot.families()
    users = {f for f in aot.families() if "philox" in aot._local_imports(f)}
    assert users == {"attention_fwd", "attention_bwd", "norms"}
    specs = {f: aot._family(f).specializations(("sm_90a",))[0] for f in ("norms", "gemm")}
    before = {f: aot._spec_hash(f, spec) for f, spec in specs.items()}
    fingerprint = aot._code_fingerprint
    monkeypatch.setattr(aot, "_code_fingerprint",
                        lambda path: fingerprint(path) + ("changed" if path.endswith("philox.py") else ""))
    after = {f: aot._spec_hash(f, spec) for f, spec in specs.items()}
    assert after["norms"] != before["norms"] and after["gemm"] == before["gemm"]


def test_import_without_native_kernels_is_lazy():
    """cutegrad imports without loading _C; the GEMM loader names the problem."""
    code = ("import sys, cutegrad; assert 'cutegrad._C' not in sys.modules; "
            "sys.modules['cutegrad._C'] = None; import cutegrad._gemm as g\n"
            "try:\n    g.native()\nexcept RuntimeError as e:\n    assert 'pip install -e .' in str(e); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


def test_build_backend_asks_for_cuda_wheels_only_without_local_nvcc(monkeypatch, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    try:
        import build_backend
    finally:
        sys.path.remove(os.path.join(ROOT, "kernels"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(build_backend.os.path, "exists", lambda p: False)
    assert build_backend._cuda_requires() == build_backend.CUDA_WHEELS
    fake_nvcc = tmp_path / "bin" / "nvcc"
    fake_nvcc.parent.mkdir()
    fake_nvcc.write_text("")
    monkeypatch.setattr(build_backend.os.path, "exists", lambda p: p == str(fake_nvcc))
    assert build_backend._cuda_requires() == []
