"""GAZE_CPU_SANITIZE=1 (set by test_cpu_sanitized.py, with AddressSanitizer preloaded): the
tests run on a sanitized build of the CPU kernels (cpu_sanitized.py) instead of gaze_ext._C,
and say so on stderr, which test_cpu_sanitized.py checks."""
import os
import sys

if os.environ.get("GAZE_CPU_SANITIZE") == "1":
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError("GAZE_CPU_SANITIZE=1 needs the AddressSanitizer runtime in LD_PRELOAD "
                           "(sanitizer.sanitized_env())")
    import cpu_sanitized

    print(f"gaze_ext._C: {cpu_sanitized.load_in_place_of_extension().__file__}", file=sys.stderr)
