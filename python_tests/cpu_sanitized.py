"""An AddressSanitizer and UndefinedBehaviorSanitizer build of the CPU kernels (the sources
of gaze_ext._C without CUDA), for test_cpu_sanitized.py: every read and write of a CPU kernel
outside a tensor's allocation or a stack buffer fails the run, which a content check cannot
see (an extra prefetch, a row-pointer table filled one entry too far), and so does undefined
behaviour (signed overflow, an oversized shift, a misaligned access).

conftest.py loads it in place of gaze_ext._C when GAZE_CPU_SANITIZE=1; the process must
have the AddressSanitizer runtime preloaded (sanitizer.sanitized_env()).
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cpu_asan"


def load_in_place_of_extension():
    """Compiles (or reuses) the sanitized CPU kernels and registers them as gaze_ext._C, so
    that `import gaze_ext` uses them; it must run before anything imports gaze_ext."""
    assert "gaze_ext._C" not in sys.modules, "the sanitized build must be loaded first"
    from torch.utils.cpp_extension import load
    sources = [CSRC / "registration.cpp", CSRC / "python_module.cpp"]
    sources += sorted((CSRC / "common").glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    # -fno-sanitize-recover: undefined behaviour aborts the run instead of printing and going on
    sanitizer = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                 "-fno-omit-frame-pointer"]
    BUILD.mkdir(parents=True, exist_ok=True)
    # The module's init function is PyInit__C (PYBIND11_MODULE(_C, ...)), hence the name.
    module = load(name="_C", sources=[str(s) for s in sources],
                  extra_cflags=["-O1", "-fopenmp"] + sanitizer,
                  extra_ldflags=["-fopenmp"] + sanitizer,
                  build_directory=str(BUILD), is_python_module=True)
    sys.modules["gaze_ext._C"] = module
    return module
