"""Build hook for the optional compiled reader; pyproject.toml holds all the metadata.

The extension is optional: where no C compiler (or no Python headers) is available the
install still succeeds and walcache reads through the pure-Python reader.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "walcache.shm._creader",
            sources=["src/walcache/shm/_creader.c"],
            extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
            # shm_open lives in librt before glibc 2.34 (an empty stub after it).
            libraries=["rt"] if sys.platform.startswith("linux") else [],
            optional=True,
        )
    ],
)
