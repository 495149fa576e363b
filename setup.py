"""Builds the compiled core `adapterhub._C` from csrc/.

CppExtension always; CUDAExtension when torch was built with CUDA, nvcc is found
and csrc/cuda holds kernels. ADAPTERHUB_BUILD_EXT=0 installs the pure-Python
package (the ops then run on the pure-PyTorch fallback).
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("ADAPTERHUB_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def sources(pattern):
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    cuda_sources = sources("csrc/cuda/lora_*.cu")  # compile_check.cu is for nvcc alone
    with_cuda = (
        os.environ.get("ADAPTERHUB_BUILD_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
    )
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    # at::parallel_for is an OpenMP pragma in a header: without -fopenmp it runs serially.
    # libgomp.so.1 resolves to the copy torch already loaded (same soname).
    extension = CUDAExtension if with_cuda else CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    if with_cuda:
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-std=c++17"]
        define_macros.append(("ADAPTERHUB_WITH_CUDA", "1"))
    module = extension(
        name="adapterhub._C",
        sources=cpp_sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )
    return [module], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
