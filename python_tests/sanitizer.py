"""GCC's sanitizers for the tests that rerun others on a sanitized build (gaze_sim's CUDA
sources, the CPU kernels): the AddressSanitizer runtime to preload and the environment of
such a run."""
import os
import subprocess


def _gcc_file(name):
    try:
        found = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True)
    except FileNotFoundError:  # no g++
        return None
    path = found.stdout.strip()
    return path if found.returncode == 0 and os.path.isabs(path) else None


def sanitizer_library():
    """GCC's AddressSanitizer runtime, which a process loading a sanitized build needs
    preloaded; None without one."""
    return _gcc_file("libasan.so")


def sanitized_env(**extra):
    """os.environ plus extra, with the runtime preloaded: first, as it must be, then
    libstdc++, so that the runtime finds __cxa_throw. Leaks are not reported (torch's and
    Python's own allocations would fill the report)."""
    preload = f"{sanitizer_library()} {_gcc_file('libstdc++.so.6') or ''}".strip()
    return dict(os.environ, ASAN_OPTIONS="detect_leaks=0", LD_PRELOAD=preload, **extra)
