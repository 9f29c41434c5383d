"""Builds felix's Cython extensions; all metadata lives in pyproject.toml.

FELIX_CYTHON_DEBUG=1 builds with annotation (.html) and line tracing, for
profiling the hot paths with coverage or line_profiler.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FELIX_CYTHON_DEBUG") == "1"
macros = [("CYTHON_TRACE", "1")] if debug else []
compile_args = ["-O3", "-std=c11"] if not debug else ["-O0", "-g", "-std=c11"]

extensions = [
    Extension(
        "felix._codec",
        ["felix/_codec.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "felix._logscan",
        ["felix/_logscan.pyx"],
        libraries=["z"],  # zlib's crc32 for payload checksums
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "felix._ring",
        ["felix/_ring.pyx"],
        include_dirs=["felix"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "felix._udpbatch",
        ["felix/_udpbatch.pyx"],
        # sendmmsg and struct mmsghdr are GNU extensions (as pyconfig.h defines it).
        define_macros=[*macros, ("_GNU_SOURCE", "1")],
        extra_compile_args=compile_args,
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=debug,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": debug,
            "embedsignature": True,
        },
    )
)
