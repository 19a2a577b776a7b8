"""Plain setuptools build: pure Python by default, nothing compiled at install time, torch not
imported. The C++ operators (csrc/) ship as sources and are built on first use
(lamb_kernels/extension.py).

One switch builds them ahead of time instead, into ``lamb_kernels/_C``, with the torch already
installed (hence no build isolation, which would fetch another torch):

    LAMB_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .
"""
import json
import os
import sys

from setuptools import setup

ext_modules, cmdclass, stamp = [], {}, []
if os.environ.get("LAMB_KERNELS_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lamb_kernels.extension import CFLAGS, SOURCES, STAMP_NAME, prebuilt_stamp

    # What the library is built from: at run time it is used only with these sources and this torch.
    with open(os.path.join("lamb_kernels", STAMP_NAME), "w", encoding="utf-8") as out:
        json.dump(prebuilt_stamp(), out)
    stamp = [STAMP_NAME]

    # Portable: no -march=native here, unlike the just-in-time build, which runs where it was built.
    ext_modules = [CppExtension("lamb_kernels._C", [f"csrc/{name}" for name in SOURCES],
                                extra_compile_args=CFLAGS, extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="lamb_kernels",
    version="0.1.0",
    description="Fused LAMB and LARS optimizers for PyTorch: Triton, C++ and pure-torch backends",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["lamb_kernels", "lamb_kernels.triton", "lamb_kernels.csrc"],
    # The C++ sources travel inside the package, so an installed copy can build them on first use.
    package_dir={"lamb_kernels.csrc": "csrc"},
    package_data={"lamb_kernels.csrc": ["*.cpp", "*.h"], "lamb_kernels": stamp},
    python_requires=">=3.10",
    # A range, never a pin: with a suitable torch already installed (CPU or CUDA build) pip keeps it.
    # ninja drives torch's just-in-time C++ build.
    install_requires=["torch>=2.4", "numpy", "ninja"],
    # matplotlib draws the benchmark's chart (python -m bench); without it the CSV is still written.
    # transformers runs examples/bert_pretrain.py (a BERT built from a config: nothing downloaded).
    extras_require={"triton": ["triton>=3.0"], "bench": ["matplotlib"], "examples": ["transformers"],
                    "test": ["pytest", "hypothesis", "triton>=3.0", "matplotlib", "transformers"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
