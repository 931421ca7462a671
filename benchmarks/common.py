"""Timing, bandwidth and reporting helpers shared by the benchmarks.

Speed is compared as ratios within one run: every variant is timed in interleaved
rounds (so drift in clocks or neighbours hits all of them alike) and the median
of all samples is kept. On CUDA, CUDA events time the device work."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(variants: Dict[str, Callable[[], object]], device: str, rounds: int = 7,
                  min_time_s: float = 0.05, warmup: int = 3) -> Dict[str, float]:
    """Median seconds per call of each variant, timed in `rounds` interleaved rounds,
    each round running a variant repeatedly for at least min_time_s."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    reps = {}
    for name, fn in variants.items():  # calibrate repetitions per round
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < min_time_s / 4 or n < 2:
            fn()
            n += 1
            synchronize(device)
        reps[name] = max(2, int(n * 4))
    samples: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_time_once(fn, reps[name], device))
    return {name: statistics.median(s) for name, s in samples.items()}


def _time_once(fn: Callable[[], object], reps: int, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def with_env(name: str, value: str, fn: Callable[[], object]) -> Callable[[], None]:
    """fn run with the environment variable `name` set to `value` (the CUDA ops read their
    GAZE_* knobs at each call), restored afterwards."""
    def run():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            fn()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    return run


def with_threads(threads: int, fn: Callable[[], object]) -> Callable[[], None]:
    """fn run with torch's CPU thread count set to `threads`, restored afterwards."""
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fn()
        finally:
            torch.set_num_threads(before)
    return run


def memory_bandwidth(device: str, nbytes: int = 1 << 28) -> Dict[str, float]:
    """Measured bytes/s: 'read' (a sum over a buffer) and 'copy' (a device-to-device copy,
    counting bytes read plus written), on buffers far larger than the caches we hope for."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_variants({"read": lambda: src.sum(), "copy": lambda: dst.copy_(src)}, device,
                          rounds=5)
    return {"read": nbytes / times["read"], "copy": 2 * nbytes / times["copy"]}


# Last-level cache assumed where the CPU's cannot be read (sysfs missing)
FALLBACK_LAST_LEVEL_CACHE = 32 << 20


def last_level_cache_bytes(device: str) -> int:
    """Bytes of the cache in front of memory: the GPU's L2, or the CPU's largest cache
    (sysfs, whose sizes read like "16384K")."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).L2_cache_size
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            if entry.startswith("index"):
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip()
                units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
                sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    except (OSError, ValueError):
        pass
    return max(sizes) if sizes else FALLBACK_LAST_LEVEL_CACHE


def environment(device: str) -> Dict[str, str]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cpu": _cpu_name(),
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, cuda=str(torch.version.cuda),
                    sm_count=str(props.multi_processor_count), driver=_driver_version())
    try:
        import gaze_ext
        info["gaze_ext_build"] = json.dumps(gaze_ext.build_info())
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str:
    # The GPU tool's copy of the tree keeps a stale .git HEAD: gpu_check.sh's caller names the
    # commit that runs.
    if os.environ.get("GAZE_COMMIT"):
        return os.environ["GAZE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(__file__), check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!results"],  # result files are rewritten by the runs
                               capture_output=True, text=True, cwd=os.path.dirname(__file__))
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def kernel_times(fn: Callable[[], object], device: str, reps: int = 5) -> List[Dict[str, object]]:
    """Device time of each kernel over `reps` calls of fn (torch.profiler), per call and
    largest first, so a report says which kernel a step's time goes to. CUDA only; a row
    naming the error when the profiler is unavailable."""
    if device != "cuda":
        return []
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        fn()
        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            synchronize(device)
        total: Dict[str, float] = {}
        count: Dict[str, int] = {}
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                name = short_kernel_name(event.name)
                total[name] = total.get(name, 0.0) + event.time_range.elapsed_us()
                count[name] = count.get(name, 0) + 1
        return [dict(kernel=name, us_per_call=t / reps, launches_per_call=count[name] / reps)
                for name, t in sorted(total.items(), key=lambda item: -item[1])]
    except Exception as error:  # the profile is a diagnostic: never fail the benchmark on it
        return [dict(kernel=f"profile unavailable: {type(error).__name__}: {error}")]


def short_kernel_name(name: str) -> str:
    """'void ns::(anonymous namespace)::kernel<T, 4>(Params)' -> 'kernel<T, 4>'."""
    name = name.removeprefix("void ")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside <...>
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(name):  # drop the namespaces: up to the last '::' outside <...>
        depth += ch == "<"
        depth -= ch == ">"
        if depth == 0 and name.startswith("::", i):
            start = i + 2
    name = name[start:].strip()
    return name if len(name) <= 80 else name[:77] + "..."


def kernel_sections(profiles: Dict[str, List[Dict[str, object]]]) -> List[str]:
    """Report lines for kernel_times results, one table per profiled variant."""
    lines = []
    for variant, rows in profiles.items():
        if rows:
            lines += ["", f"Kernels of `{variant}` (device time per call, torch.profiler):", "",
                      markdown_table(rows, ["kernel", "us_per_call", "launches_per_call"])]
    return lines


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def benchmark_main(name: str, description: str,
                   run_device: Callable[[str, bool], Dict[str, object]],
                   report: Callable[[Dict[str, object]], str], default_out: str,
                   argv: Optional[List[str]] = None) -> int:
    """The command line shared by the benchmarks: runs on the CPU and on CUDA when present
    (--device), with the FlexAttention peer unless --no-flex (it compiles for up to a
    minute), writes <name>-<device>.md/.json to --out, and with --check exits 1 when a
    result's "verdicts" hold a MISS."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--out", default=default_out, help="folder for the result files")
    parser.add_argument("--no-flex", action="store_true", help="leave out the FlexAttention peer")
    args = parser.parse_args(argv)
    import gaze_ext
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not (torch.cuda.is_available() and gaze_ext.build_info()["cuda"]):
        if args.device == "cuda":
            print("no GPU or no CUDA kernels: nothing to run on cuda", file=sys.stderr)
            return 1
        devices.remove("cuda")
    os.makedirs(args.out, exist_ok=True)
    missed = False
    for device in devices:
        result = run_device(device, not args.no_flex)
        text = report(result)
        print(text)
        with open(os.path.join(args.out, f"{name}-{device}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"{name}-{device}.json"), "w") as f:
            json.dump(result, f, indent=1)
        missed |= "MISS" in result.get("verdicts", {}).values()
    return 1 if (args.check and missed) else 0
