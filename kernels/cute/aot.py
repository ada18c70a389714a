"""Ahead-of-time build of every CuTeDSL kernel specialization.

Run by the build (setup.py's build_ext) on a machine that needs no GPU:

    python kernels/cute/aot.py --out build/aot --archs sm_90a

A kernel family is any module in this folder that defines
``specializations(archs)``, ``build_kernel(spec)`` and ``emit_registry(entries)``
(found by reading the folder, so a new family needs no edit here; see
docs/kernels.md).  For each family it asks the module for its specializations, compiles each with cute.compile over fake
tensors and exports it with export_to_c (name.h + name.o), then writes the C++
table that lets cutegrad._C find and launch them (``<family>_registry.cpp``)
and ``manifest.json`` (the objects to link).

Objects are cached under ``<out>/cache/<hash>/`` where the hash covers the
family's code (its syntax tree without docstrings, and that of the modules of
this folder it imports, such as philox), the spec and the DSL version, so an unchanged rebuild compiles nothing.  Missing specializations are compiled in parallel worker
processes; each worker sets CUTE_DSL_ARCH to its target before importing
cutlass (with no GPU the DSL would otherwise assume sm_100a while tracing).
"""

import argparse
import ast
import concurrent.futures as futures
import dataclasses
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_FAMILY_FUNCTIONS = {"specializations", "build_kernel", "emit_registry"}
COMPILE_OPTIONS = "--gpu-arch {arch} --host-target 'llvm -mtriple=x86_64-unknown-linux-gnu'"


def families():
    """Names of the kernel family modules in this folder, sorted (found without importing them)."""
    names = []
    for fname in sorted(os.listdir(HERE)):
        if not fname.endswith(".py") or fname.startswith("_") or fname == "aot.py":
            continue
        with open(os.path.join(HERE, fname)) as f:
            tree = ast.parse(f.read())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if _FAMILY_FUNCTIONS <= defined:
            names.append(fname[:-3])
    return tuple(names)


def _family(name):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return __import__(name)


def _code_fingerprint(path):
    """The module's syntax tree without docstrings: editing comments or
    docstrings does not recompile kernels, any code change does."""
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def _local_imports(name, seen=None):
    """Modules of this folder that module `name` imports, directly or through each other
    (helpers shared by families, e.g. philox), sorted: their code is part of the family's."""
    seen = set() if seen is None else seen
    with open(os.path.join(HERE, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            imported = [node.module]
        else:
            continue
        for mod in imported:
            if mod not in seen and mod != name and os.path.exists(os.path.join(HERE, f"{mod}.py")):
                seen.add(mod)
                _local_imports(mod, seen)
    return sorted(seen)


def _spec_hash(family, spec):
    h = hashlib.sha256()
    h.update(_code_fingerprint(os.path.join(HERE, f"{family}.py")).encode())
    for helper in _local_imports(family):
        h.update(_code_fingerprint(os.path.join(HERE, f"{helper}.py")).encode())
    h.update(repr(dataclasses.asdict(spec)).encode())
    h.update(importlib.metadata.version("nvidia-cutlass-dsl").encode())
    h.update(COMPILE_OPTIONS.encode())
    return h.hexdigest()[:20]


def _init_worker(arch):
    # Must precede the first cutlass import in this process.
    os.environ["CUTE_DSL_ARCH"] = arch
    if HERE not in sys.path:  # the specs arrive pickled by reference to their family module
        sys.path.insert(0, HERE)


def _compile_one(family, spec, out_dir):
    module = _family(family)
    import cutlass.cute as cute

    t0 = time.time()
    fn, args = module.build_kernel(spec)
    compiled = cute.compile(fn, *args, options=COMPILE_OPTIONS.format(arch=spec.arch))
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    compiled.export_to_c(tmp, spec.name, function_prefix=spec.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return spec.name, time.time() - t0


def build(out, archs, jobs):
    cache = os.path.join(out, "cache")
    os.makedirs(cache, exist_ok=True)
    manifest = {"objects": [], "sources": [], "include_dirs": [], "compiled": [], "cached": []}
    for family in families():
        module = _family(family)
        specs = module.specializations(archs)
        todo = {}
        entries = []
        for spec in specs:
            d = os.path.join(cache, _spec_hash(family, spec))
            entries.append((spec, d))
            if os.path.exists(os.path.join(d, spec.name + ".o")):
                manifest["cached"].append(spec.name)
            else:
                todo.setdefault(spec.arch, []).append((spec, d))
        for arch, work in todo.items():
            ctx = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(arch,)) as pool:
                running = [pool.submit(_compile_one, family, s, d) for s, d in work]
                for fut in futures.as_completed(running):
                    name, secs = fut.result()
                    manifest["compiled"].append(name)
                    print(f"[aot] compiled {name} in {secs:.1f}s", flush=True)
        registry = os.path.join(out, f"{family}_registry.cpp")
        text = module.emit_registry([(s, os.path.join(d, s.name + ".h")) for s, d in entries])
        old = open(registry).read() if os.path.exists(registry) else None
        if old != text:  # keep the timestamp so an unchanged build does not recompile it
            with open(registry, "w") as f:
                f.write(text)
        manifest["sources"].append(registry)
        manifest["objects"] += [os.path.join(d, s.name + ".o") for s, d in entries]
    print(f"[aot] {len(manifest['compiled'])} compiled, {len(manifest['cached'])} from cache", flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default=os.environ.get("CUTEGRAD_CUDA_ARCHS", "sm_90a"),
                   help="comma- or semicolon-separated targets, e.g. sm_90a,sm_100a")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    archs = tuple(x.strip() for x in a.archs.replace(";", ",").split(",") if x.strip())
    build(a.out, archs, a.jobs)


if __name__ == "__main__":
    main()
