"""PEP 517 backend: setuptools, plus the CUDA toolkit wheels as a build
requirement only when no local toolkit (nvcc) is found, so a fresh machine
builds with no manual CUDA install and a machine with CUDA downloads nothing."""

import os
import shutil

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks we do not change)

CUDA_WHEELS = ["cuda-toolkit[nvcc,cudart]>=13.0,<14"]


def _local_nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return True
    return shutil.which("nvcc") is not None


def _cuda_requires():
    return [] if _local_nvcc() else CUDA_WHEELS


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cuda_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _cuda_requires()
