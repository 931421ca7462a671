"""Builds gaze_sim: the package's CUDA sources compiled as C++ against a CPU
emulator of the CUDA execution model (csrc/cuda_sim/gaze_sim.h), so the kernels'
indexing, synchronisation and tensor-core fragment arithmetic run in the tests of a
machine without a GPU. Its ops are torch.ops.gaze_sim.<op> with the CUDA ops'
arguments (all positional) on CPU tensors.

Each source is rewritten a little on the way:
- `kernel<<<grid, block, shared, stream>>>(args)` -> `gaze_sim::Launch(grid, block,
  shared, stream).run(kernel, args)`;
- `extern __shared__ T name[];` -> a pointer to the launch's dynamic shared memory;
- `__shared__ T name[N];` -> a reference to per-block storage (poisoned before each block);
- every kernel first records its name (torch.ops.gaze_sim.take_launched_kernels());
- `TORCH_LIBRARY_IMPL(gaze, CUDA, m) { m.impl(...) }` -> definitions of gaze_sim ops;
- index contents are checked as on a GPU: only under GAZE_CHECK_INDICES=1.
"""
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cuda_sim"

LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(?P<config>.*?)>>>\((?P<no_args>\))?",
                    re.S)
STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[\w:]+(?:<[^;]*?>)?)\s+(?P<names>[^;]+);")
DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[\w: ]+?)\s+(?P<name>\w+)\[\];")
KERNEL_BODY = re.compile(r"(__global__[^{;]*\{)")
REGISTRATION = "TORCH_LIBRARY_IMPL(gaze, CUDA, m)"
CPU_ALWAYS_CHECKS = "  if (device.is_cpu()) return true;\n"


def cuda_include_dir():
    from torch.utils.cpp_extension import CUDA_HOME
    for home in (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "include" / "cuda_runtime.h").exists():
            return pathlib.Path(home) / "include"
    return None


def available():
    return cuda_include_dir() is not None


def static_shared(match):
    """`__shared__ T a[N], b;` -> references to gaze_sim's per-block storage."""
    out = []
    for declarator in match["names"].split(","):
        name, _, dims = declarator.strip().partition("[")
        dims = "[" + dims if dims else ""
        out.append(f"static const char gaze_sim_key_{name} = 0; "
                   f"auto& {name} = ::gaze_sim::shared_variable<{match['type']}{dims}>("
                   f"&gaze_sim_key_{name});")
    return " ".join(out)


def rewrite(text, name):
    text = LAUNCH.sub(lambda m: f"::gaze_sim::Launch({m['config']}).run({m['kernel']}"
                      + (")" if m["no_args"] else ", "), text)
    text = KERNEL_BODY.sub(r"\1 ::gaze_sim::note_kernel(__PRETTY_FUNCTION__);", text)
    text = DYNAMIC_SHARED.sub(
        lambda m: f"{m['type']}* const {m['name']} = ::gaze_sim::dynamic_shared<{m['type']}>();",
        text)
    text = STATIC_SHARED.sub(static_shared, text)
    if REGISTRATION in text:
        head, registration = text.split(REGISTRATION)
        text = head + "TORCH_LIBRARY_FRAGMENT(gaze_sim, m)" + registration.replace("m.impl(", "m.def(")
    assert "<<<" not in text and "__shared__" not in text, f"{name}: not fully rewritten"
    return text


def write_if_changed(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build(verbose=False, sanitize=False):
    """Compiles (or reuses) gaze_sim and loads its ops into this process. sanitize: with
    AddressSanitizer (the process needs sanitizer.sanitized_env()'s preloads), so every read
    and write of the kernels is bounds-checked: a memcheck without a GPU; and with
    UndefinedBehaviorSanitizer, which aborts on a misaligned access (a vector load or store
    whose address a GPU would fault on), a signed overflow or an oversized shift."""
    from torch.utils.cpp_extension import load
    include = cuda_include_dir()
    assert include is not None, "gaze_sim needs the CUDA headers (cuda_runtime.h)"
    src = BUILD / "src"
    sources = []
    for path in sorted((CSRC / "cuda").iterdir()):
        rewritten = rewrite(path.read_text(), path.name)
        if path.suffix == ".cu":
            target = src / "cuda" / (path.stem + ".cpp")
            sources.append(target)
        else:
            target = src / "cuda" / path.name
        write_if_changed(target, rewritten)
    selftest = CSRC / "cuda_sim" / "selftest.cu"
    sources.append(src / "cuda_sim" / "selftest.cpp")
    write_if_changed(sources[-1], rewrite(selftest.read_text(), selftest.name))
    for path in sorted((CSRC / "common").iterdir()):
        text = path.read_text()
        if path.name == "checks.cpp":
            assert CPU_ALWAYS_CHECKS in text, "checks.cpp: index_contents_checked changed"
            text = text.replace(CPU_ALWAYS_CHECKS, "")
        write_if_changed(src / "common" / path.name, text)
    sources += [src / "common" / "op_args.cpp", src / "common" / "checks.cpp",
                CSRC / "cuda_sim" / "gaze_sim.cpp"]
    # 1 MiB of region_topk scratch per launch (a GPU build has 512 MiB): a few rows with
    # tens of thousands of regions take several launches.
    flags = ["-O1", "-std=c++20", "-DGAZE_CUDA_SIM", "-DGAZE_TOPK_SCRATCH_BYTES=1048576",
             "-include", str(CSRC / "cuda_sim" / "gaze_sim.h")]
    sanitizer = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                 "-fno-omit-frame-pointer"] if sanitize else []
    name = "gaze_cuda_sim_asan" if sanitize else "gaze_cuda_sim"
    objects = BUILD / name
    objects.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=[str(s) for s in sources], extra_cflags=flags + sanitizer,
         extra_ldflags=sanitizer,
         extra_include_paths=[str(CSRC / "cuda_sim" / "include"), str(include)],
         build_directory=str(objects), is_python_module=False, verbose=verbose)


if __name__ == "__main__":
    build(verbose=True)
