"""The CPU kernels' tests again, on an AddressSanitizer and UndefinedBehaviorSanitizer build
of the kernels (cpu_sanitized.py): a read or write outside a tensor or a stack buffer, or
undefined behaviour, fails the run, even where the values it produced were right. The
widest vector level runs every op test; the lower ones (forced as in test_cpu_isa.py) the
kernel tests, for their own loop tails."""
import os
import platform
import subprocess
import sys

import pytest

from sanitizer import sanitized_env, sanitizer_library
from test_cpu_isa import KERNEL_TESTS

HERE = os.path.dirname(os.path.abspath(__file__))
OP_TESTS = KERNEL_TESTS + ["test_errors.py", "test_opcheck.py", "test_autocast.py",
                           "test_block.py"]


def run_sanitized(tests, **env):
    return subprocess.run(
        # -s: the sanitizer's report goes to stderr, which pytest's capture would lose
        [sys.executable, "-m", "pytest", "-x", "-q", "-s", "-p", "no:cacheprovider",
         "-k", "cpu or not cuda"] + [os.path.join(HERE, t) for t in tests],
        env=sanitized_env(GAZE_CPU_SANITIZE="1", **env), capture_output=True, text=True,
        cwd=os.path.dirname(HERE))


def assert_clean(run):
    report = run.stdout[-3000:] + run.stderr[-6000:]
    assert run.returncode == 0, report
    assert "AddressSanitizer" not in run.stderr and "runtime error:" not in run.stderr, report


@pytest.mark.skipif(os.environ.get("GAZE_CPU_SANITIZE") == "1" or sanitizer_library() is None,
                    reason="inside the sanitized run, or no AddressSanitizer runtime")
@pytest.mark.parametrize("isa", ["widest", "avx2", "baseline"])
def test_cpu_kernels_under_sanitizers(isa):
    if isa == "widest":
        assert_clean(run_sanitized(OP_TESTS))
    elif platform.machine() != "x86_64":
        pytest.skip("one vector width off x86-64")
    else:
        assert_clean(run_sanitized(KERNEL_TESTS, GAZE_CPU_ISA=isa))
