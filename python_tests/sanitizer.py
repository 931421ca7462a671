"""GCC's sanitizers for the tests that rerun others on a sanitized build (gaze_sim's CUDA
sources, the CPU kernels): the AddressSanitizer runtime to preload, the environment of such
a run, and the check of its outcome."""
import os
import subprocess


def _compiler_file(name):
    """A file of the compiler torch's extension builds use ($CXX, else c++), so that the
    preloaded runtime is the one the sanitized build was linked against."""
    compiler = os.environ.get("CXX") or "c++"
    try:
        found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                               text=True)
    except FileNotFoundError:
        return None
    path = found.stdout.strip()
    return path if found.returncode == 0 and os.path.isabs(path) else None


def sanitizer_library():
    """The AddressSanitizer runtime, which a process loading a sanitized build needs
    preloaded; None without one."""
    return _compiler_file("libasan.so")


def sanitized_env(**extra):
    """os.environ plus extra, with the runtime preloaded: first, as it must be, then
    libstdc++, so that the runtime finds __cxa_throw. Leaks are not reported (torch's and
    Python's own allocations would fill the report); undefined behaviour is, with a stack."""
    runtime = sanitizer_library()
    if runtime is None:
        raise RuntimeError("no AddressSanitizer runtime (libasan.so) beside the C++ compiler")
    preload = f"{runtime} {_compiler_file('libstdc++.so.6') or ''}".strip()
    return dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1",
                LD_PRELOAD=preload, **extra)


def assert_clean(run):
    """A sanitized pytest run (subprocess.CompletedProcess, with -s so that reports reach its
    stderr) passed, and neither sanitizer reported anything."""
    report = run.stdout[-3000:] + run.stderr[-6000:]
    assert run.returncode == 0, report
    assert "AddressSanitizer" not in run.stderr and "runtime error:" not in run.stderr, report
