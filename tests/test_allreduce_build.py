"""The CuTeDSL all-reduce compiles for sm_90a and sm_103a (whatever the build's arch list), and its SASS
has what the design needs: system-scope strong stores/loads and fences for the epoch flags, 16-byte vector
loads and stores for the data, and no local memory (no spills, no stack)."""
import os
import re
import subprocess
import sys
import tempfile

import pytest

from test_build import ROOT, cuda_tool, sass_listings

pytest.importorskip("cutlass", reason="the CuTeDSL compiler (nvidia-cutlass-dsl) is needed to compile the kernels")

COMPILE = r"""
import sys
sys.path.insert(0, {cute_dir!r})
import aot
aot._init_worker({arch!r})
import allreduce
for spec in allreduce.specializations(({arch!r},)):
    aot._compile_one("allreduce", spec, {out!r} + "/" + spec.name)
    print(spec.name)
"""


@pytest.fixture(scope="module")
def compiled():
    """Every specialization for both arches, through aot.py's own compile path, into a temp dir."""
    cuda_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as out:
        names = {}
        for arch in ("sm_90a", "sm_103a"):
            run = subprocess.run([sys.executable, "-c", COMPILE.format(cute_dir=os.path.join(ROOT, "kernels", "cute"),
                                                                      arch=arch, out=out)],
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            names[arch] = run.stdout.split()
        objects = [os.path.join(out, name, name + ".o") for specs in names.values() for name in specs]
        yield names, {obj[:-2]: listing for obj, listing in sass_listings(objects)}


def test_every_specialization_compiles_for_both_arches(compiled):
    names, _ = compiled
    for arch in ("sm_90a", "sm_103a"):
        assert sorted(names[arch]) == sorted(f"allreduce_{arch}_{a}_{d}" for a in ("one_shot", "two_shot")
                                             for d in ("bf16", "fp16", "fp32"))


def test_sass_has_system_scope_flags_vector_data_and_no_local_memory(compiled):
    _, listings = compiled
    for name, sass in listings.items():
        barriers = 2 if "two_shot" in name else 1
        assert sass.count("STG.E.STRONG.SYS") >= barriers, f"{name}: no st.release.sys arrival stores"
        assert sass.count("LDG.E.STRONG.SYS") >= barriers, f"{name}: no system-scope spin loads"
        assert "MEMBAR.ALL.SYS" in sass, f"{name}: no system-scope fence"
        assert "LDG.E.128" in sass and "STG.E.128" in sass, f"{name}: data not moved in 16-byte vectors"
        narrow = re.findall(r"(?:LDG|STG)\.E\.(?:U16|S16|16)\b", sass)
        assert not narrow, f"{name}: 2-byte global accesses {narrow[:3]}: the data path lost its vectors"
        assert "LDL" not in sass and "STL" not in sass, f"{name}: local memory accesses (spills)"
        usage = re.findall(r"STACK:(\d+).*?LOCAL:(\d+)", sass)
        assert usage and all(int(s) == 0 and int(l) == 0 for s, l in usage), f"{name}: stack/local {usage}"
        assert "MULTIMEM" not in sass.upper(), f"{name}: NVLink multicast instruction"
