"""The CPU kernels' tests again, on an AddressSanitizer and UndefinedBehaviorSanitizer build
of the kernels (cpu_sanitized.py): a read or write outside a tensor or a stack buffer, or
undefined behaviour, fails the run, even where the values it produced were right. The
widest vector level runs every op test; each lower one this CPU has (forced as in
test_cpu_isa.py) the kernel tests, for their own loop tails."""
import os
import platform
import subprocess
import sys

import pytest

import cpu_sanitized
from helpers import KERNEL_TESTS, simd_level_used
from sanitizer import assert_clean, sanitized_env, sanitizer_library

HERE = os.path.dirname(os.path.abspath(__file__))
OP_TESTS = KERNEL_TESTS + ["test_errors.py", "test_opcheck.py", "test_autocast.py",
                           "test_block.py"]


def run_sanitized(tests, isa=None):
    env = sanitized_env(GAZE_CPU_SANITIZE="1")
    env.pop("GAZE_CPU_ISA", None)
    if isa is not None:
        env["GAZE_CPU_ISA"] = isa
    run = subprocess.run(
        # -s: the sanitizers' reports go to stderr, which pytest's capture would lose
        [sys.executable, "-m", "pytest", "-x", "-q", "-s", "-p", "no:cacheprovider",
         "-k", "cpu or not cuda"] + [os.path.join(HERE, t) for t in tests],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    assert_clean(run)
    # conftest.py loaded the sanitized build, not gaze_ext._C
    assert f"gaze_ext._C: {cpu_sanitized.BUILD}" in run.stderr, run.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("GAZE_CPU_SANITIZE") == "1" or sanitizer_library() is None,
                    reason="inside the sanitized run, or no AddressSanitizer runtime")
@pytest.mark.parametrize("isa", ["widest", "avx2", "baseline"])
def test_cpu_kernels_under_sanitizers(isa):
    if isa == "widest":
        run_sanitized(OP_TESTS)
        return
    if platform.machine() != "x86_64":
        pytest.skip("one vector width off x86-64")
    used, widest = simd_level_used(isa), simd_level_used()
    if used != isa or used == widest:
        pytest.skip(f"{isa}: this CPU uses {used} for it, and {widest} at its widest")
    run_sanitized(KERNEL_TESTS, isa)
