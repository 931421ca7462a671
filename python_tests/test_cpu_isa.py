"""The CPU kernels are built for three x86-64 levels and the widest the machine has is used;
run the kernel tests again with each lower level forced (GAZE_CPU_ISA), so every
vector width is checked whatever the test machine."""
import os
import platform
import subprocess
import sys

import pytest

import gaze_ext
from helpers import KERNEL_TESTS, simd_level_used


@pytest.mark.skipif(platform.machine() != "x86_64", reason="one vector width off x86-64")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_kernels_at_lower_simd_level(isa):
    here = os.path.dirname(__file__)
    env = dict(os.environ, GAZE_CPU_ISA=isa)
    used = simd_level_used(isa)
    if used != isa:
        pytest.skip(f"this CPU cannot run {isa} (uses {used})")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu or not cuda"]
        + [os.path.join(here, t) for t in KERNEL_TESTS],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(here))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_build_info_names_the_level():
    assert gaze_ext.build_info()["cpu_simd"] in ("avx512", "avx2", "baseline")
