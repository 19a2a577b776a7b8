"""Plain setuptools build: pure Python by default, nothing compiled at install time, torch not
imported. The C++ operators (csrc/) ship as sources and are built on first use
(lamb_kernels/extension.py).

One switch builds them ahead of time instead, into ``lamb_kernels/_C``, with the torch already
installed (hence no build isolation, which would fetch another torch); with a CUDA build of torch and
nvcc (CUDA_HOME) it also builds the CUDA kernels (csrc/cuda) into ``lamb_kernels/_C_cuda``, for sm_80
and sm_90, with compute_90 PTX for later GPUs:

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

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda and CUDA_HOME:
        from lamb_kernels.extension import (AHEAD_OF_TIME_ARCHES, CUDA_FLAGS, CUDA_SOURCES, CUDA_STAMP_NAME,
                                            cuda_arch_flags, cuda_prebuilt_stamp)

        with open(os.path.join("lamb_kernels", CUDA_STAMP_NAME), "w", encoding="utf-8") as out:
            json.dump(cuda_prebuilt_stamp(), out)
        stamp.append(CUDA_STAMP_NAME)
        ptx = f"-gencode=arch=compute_{AHEAD_OF_TIME_ARCHES[-1]},code=compute_{AHEAD_OF_TIME_ARCHES[-1]}"
        ext_modules.append(CUDAExtension(
            "lamb_kernels._C_cuda", [f"csrc/{name}" for name in CUDA_SOURCES],
            extra_compile_args={"cxx": ["-O3"], "nvcc": [*CUDA_FLAGS, *cuda_arch_flags(AHEAD_OF_TIME_ARCHES), ptx]},
        ))

# The project's metadata and dependencies are in pyproject.toml; what is here is the package layout and
# the optional ahead-of-time build.
setup(
    packages=["lamb_kernels", "lamb_kernels.optimizers", "lamb_kernels.triton", "lamb_kernels.csrc"],
    # The C++ sources travel inside the package, so an installed copy can build them on first use.
    package_dir={"lamb_kernels.csrc": "csrc"},
    package_data={"lamb_kernels.csrc": ["*.cpp", "*.h", "cuda/*.cpp", "cuda/*.cu", "cuda/*.h", "cuda/*.cuh"],
                  "lamb_kernels": stamp},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
