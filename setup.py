"""Build the compiled SMTP core: every ``csrc/NAME.pyx`` becomes ``relay._NAME``.

Release builds are optimised and carry no tracing.  ``RELAY_DEBUG=1`` makes a
debug build instead: Cython writes annotated HTML beside the generated C in
``build/cython-debug``, line tracing is compiled in (for coverage and
profilers) and the C macro ``RELAY_DEBUG`` turns on the invariant checks in
the ``.pyx`` sources.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("RELAY_DEBUG", "") not in ("", "0")

directives = {
    "language_level": "3",
    "embedsignature": True,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "linetrace": DEBUG,
}

if DEBUG:
    macros = [("RELAY_DEBUG", "1"), ("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    compile_args = ["-O0", "-g"]
else:
    macros = [("RELAY_DEBUG", "0")]
    compile_args = ["-O2"]

extensions = [
    Extension(
        f"relay._{source.stem}",
        [str(source)],
        define_macros=macros,
        extra_compile_args=compile_args,
    )
    for source in sorted(Path("csrc").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=DEBUG,
        include_path=["csrc"],
        # Each mode keeps its own generated C, so switching RELAY_DEBUG on or
        # off regenerates it instead of reusing C from the other mode.
        build_dir="build/cython-debug" if DEBUG else "build/cython-release",
    ),
)
