"""benchmarks/gpu_check.sh, the one call a GPU session makes, run here with stubs in place
of the GPU machine's commands (python3, nvidia-smi, nvcc, compute-sanitizer): the steps it
runs and their order, the call's time budget, and a report written whatever a step does.
A session gets one such call, so a mistake in the script costs the session's results."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# python3 as gpu_check.sh calls it: every call logged; the benchmarks write stub reports.
STUB_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_CALLS"
case "$*" in
  *"setup.py build_ext"*) echo built ;;
  *"import xdist"*) exit 0 ;;
  *"-m pytest"*)  # a hang that ignores SIGTERM, as a process stuck in a GPU kernel may
    [ -n "${STUB_TESTS_HANG:-}" ] && { trap '' TERM; exec sleep 300; }
    echo "3 passed in 0.10s" ;;
  *"-m benchmarks.sanitize_case"*) echo "sanitize case finished" ;;
  *"-m benchmarks.decode"* | *"-m benchmarks.prefill"*)
    name=$([[ "$*" == *benchmarks.decode* ]] && echo decode || echo prefill)
    out=$(echo "$*" | sed -n 's/.*--out \([^ ]*\).*/\1/p')
    echo "# $name stub report" > "$out/$name-cuda.md"
    echo "{}" > "$out/$name-cuda.json" ;;
  *) echo "stub python: $*" ;;
esac
"""
STUBS = {
    "python3": STUB_PYTHON,
    # compute-sanitizer --tool TOOL --error-exitcode 1 PROGRAM...
    "compute-sanitizer": '#!/usr/bin/env bash\nshift 4\nexec "$@"\n',
    "nvidia-smi": "#!/usr/bin/env bash\necho 'Stub GPU, 0.0, 1 MiB'\n",
    "nvcc": "#!/usr/bin/env bash\necho 'stub nvcc'\n",
    "ncu": "#!/usr/bin/env bash\necho \"stub ncu $*\"\n",
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_check(tmp_path, *args, budget=None, tests_hang=False):
    """Runs gpu_check.sh with the stubs; returns (return code, seconds, report, the stub
    python's calls, the files left in $OUT)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python3"),
               OUT=str(out), STUB_CALLS=str(tmp_path / "calls"), GAZE_COMMIT="abc1234")
    env.pop("GAZE_CHECK_SECONDS", None)
    if budget is not None:
        env["GAZE_CHECK_SECONDS"] = str(budget)
    if tests_hang:
        env["STUB_TESTS_HANG"] = "1"
    start = time.monotonic()
    # its own session, so that a script that overruns is stopped with its stubs
    check = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, stderr = check.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(check.pid, signal.SIGKILL)
        check.communicate()
        raise
    # (bash reports a step that timeout had to kill; nothing else may reach stderr)
    assert not [line for line in stderr.splitlines() if " Killed " not in line], stderr
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    report = (out / "report.md").read_text()
    return check.returncode, time.monotonic() - start, report, calls, sorted(os.listdir(out))


def step_rows(report):
    return [line.split("|")[1:3] for line in report.splitlines() if line.count("|") == 4
            and not line.startswith("| step") and not line.startswith("|---")]


def test_full_check_runs_every_step_and_reports_them(tmp_path):
    rc, _, report, calls, files = run_check(tmp_path)
    assert rc == 0
    # build, memcheck of the small case, both benchmarks (no FlexAttention), then the suite
    kinds = ["build_ext", "sanitize_case", "benchmarks.decode", "benchmarks.prefill", "pytest"]
    steps = [next(kind for kind in kinds if kind in call) for call in calls
             if any(kind in call for kind in kinds)]
    assert steps == kinds
    assert all("--no-flex" in call for call in calls if "benchmarks." in call and "--out" in call)
    pytest_call = next(call for call in calls if "-m pytest" in call)
    assert "-n 4 python_tests" in pytest_call and "--ignore=python_tests/test_cuda_sim.py" in pytest_call
    rows = step_rows(report)
    assert [name.strip() for name, _ in rows] == ["build", "memcheck", "decode-benchmark",
                                                  "prefill-benchmark", "tests", "ncu decode",
                                                  "ncu prefill"]
    assert all(result.strip() == "ok" for _, result in rows)
    assert "- commit: abc1234" in report and "Stub GPU" in report
    assert "# decode stub report" in report and "# prefill stub report" in report
    assert "3 passed in 0.10s" in report
    # the device tool brings back at most 8 files a call
    assert files == ["build.log", "decode-cuda.json", "memcheck.log", "ncu-decode.txt",
                     "ncu-prefill.txt", "prefill-cuda.json", "report.md", "tests.log"]
    profile = (tmp_path / "out" / "ncu-decode.txt").read_text()
    assert "--kernel-name regex:attention_" in profile and "benchmarks.profile_case decode" in profile
    profile = (tmp_path / "out" / "ncu-prefill.txt").read_text()
    assert "regex:attention_forward_tiled|" in profile and "--launch-count 3" in profile
    assert "benchmarks.profile_case prefill" in profile and "--section SchedulerStats" in profile


def test_a_hanging_suite_is_killed_within_the_budget_and_the_report_is_written(tmp_path):
    budget = 20  # 15 s of it kept for the report: the suite gets what the other steps left
    rc, seconds, report, _, _ = run_check(tmp_path, budget=budget, tests_hang=True)
    assert rc == 0  # the script's own status: the report says what failed
    assert seconds < budget
    rows = dict((name.strip(), result.strip()) for name, result in step_rows(report))
    assert rows["tests"].startswith("FAILED (killed: 5 s past its limit")
    assert rows["decode-benchmark"] == rows["prefill-benchmark"] == "ok"
    assert rows["ncu decode"] == rows["ncu prefill"] == "skipped: under 90 s of the budget left"
    assert "# decode stub report" in report


def test_steps_past_the_budget_are_skipped_and_reported(tmp_path):
    rc, _, report, calls, _ = run_check(tmp_path, "sanitizers", budget=5)
    assert rc == 0
    assert not any("sanitize_case" in call or "build_ext" in call for call in calls)
    rows = step_rows(report)
    assert [name.strip() for name, _ in rows] == ["build", "racecheck", "synccheck", "initcheck"]
    assert all(result.strip() == "skipped: the call's 5 s were spent" for _, result in rows)
