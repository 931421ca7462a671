"""Builds gaze_ext._C: CPU kernels always, CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present.

Environment:
  GAZE_BUILD_CUDA=0|1     force the CUDA kernels off / on (default: on when possible)
  TORCH_CUDA_ARCH_LIST    CUDA targets (default "8.0;9.0"; never detected from a GPU)
  CUDA_HOME               CUDA toolkit (default /usr/local/cuda, then nvcc on PATH)
  MAX_JOBS                parallel compile jobs
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def find_cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script: resolve links, then go up from bin/.
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


# torch.utils.cpp_extension reads CUDA_HOME once, at import.
CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def build_cuda():
    flag = os.environ.get("GAZE_BUILD_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not possible:
        raise RuntimeError(
            "GAZE_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return possible


def warn_about_compiler_script():
    """A CXX that is a shell script around g++ (the GPU image's /opt/gcc/bin/g++ adds -B and
    -isystem paths of another GCC) built an extension that crashed on every C++ exception
    instead of raising RuntimeError. Nothing tells such a wrapper apart in general; a script
    is the case seen, so say so and go on."""
    path = shutil.which(os.environ.get("CXX", "") or "c++")
    try:
        with open(path or "", "rb") as f:
            is_script = f.read(2) == b"#!"
    except OSError:
        return
    if is_script:
        print(f"gaze_ext: warning: the C++ compiler {path} is a script; if the built ops crash "
              "where they should raise RuntimeError, build with CXX=/usr/bin/g++ (see README)")


def extension():
    sources = ["csrc/registration.cpp", "csrc/python_module.cpp"]
    sources += sorted(glob.glob("csrc/common/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-g0", "-fopenmp"]
    if not build_cuda():
        return CppExtension("gaze_ext._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])

    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    arch_tag = "_".join("sm" + re.sub(r"[^0-9a-z]", "", a) for a in re.split(r"[;\s,]+", archs) if a)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    defines = ["-DGAZE_WITH_CUDA", f"-DGAZE_CUDA_ARCHS={arch_tag}"]
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]
    return CUDAExtension(
        "gaze_ext._C",
        sources,
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=["-fopenmp"],
    )


warn_about_compiler_script()
setup(
    packages=find_packages(include=["gaze_ext", "gaze_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
