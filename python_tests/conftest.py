"""GAZE_CPU_SANITIZE=1 (set by test_cpu_sanitized.py, with AddressSanitizer preloaded): the
tests run on a sanitized build of the CPU kernels (cpu_sanitized.py) instead of gaze_ext._C."""
import os

if os.environ.get("GAZE_CPU_SANITIZE") == "1":
    import cpu_sanitized

    cpu_sanitized.load_in_place_of_extension()
