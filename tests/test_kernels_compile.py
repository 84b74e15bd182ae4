"""Every kernel in rawkernels/ compiles for sm_80, sm_86, sm_87, sm_89 and sm_90 without
register spills (sm_86/87/89 build the float32-partials stats pass).

NVRTC comes from the ``cuda-bindings`` + ``nvidia-cuda-nvrtc`` wheels and the
CUDA headers from ``nvidia-cuda-runtime`` (the ``compile`` extra), so no GPU and
no CUDA toolkit are needed; the same check through ``nvcc`` runs where one is
installed. ``python tests/test_kernels_compile.py`` prints the ptxas table.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cupylars import cuda, cuda_runtime, plan
from cupylars.config import LarsConfig

# sm_86, sm_87 and sm_89 (float64 at 1/64 of the float32 rate) compile the stats pass
# with float32 partials (LARS_STATS_F32_PARTIALS in lars_common.cuh), the others in float64.
ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
_ENTRY = re.compile(
    r"Compiling entry function '(?P<name>\w+)' for '(?P<arch>sm_\d+a?)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads.*?"
    r"Used (?P<regs>\d+) registers",
    re.S,
)


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {kernel: {regs, stack, spill_stores, spill_loads}}."""
    out = {}
    for m in _ENTRY.finditer(log):
        out[m["name"]] = {
            "regs": int(m["regs"]),
            "stack": int(m["stack"]),
            "spill_stores": int(m["stores"]),
            "spill_loads": int(m["loads"]),
        }
    return out


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        pytest.skip(
            "NVRTC not installed: pip install cuda-bindings nvidia-cuda-nvrtc nvidia-cuda-runtime "
            "(the 'compile' extra) to compile the kernels without a GPU"
        )
    try:
        nvrtc.nvrtcVersion()
    except Exception as e:  # the bindings load libnvrtc lazily
        pytest.skip(f"cuda-bindings is installed but libnvrtc does not load ({e}): install nvidia-cuda-nvrtc")
    return nvrtc


def _include_dirs() -> list[str]:
    dirs = cuda.cuda_include_dirs()
    if not dirs:
        pytest.skip("no CUDA headers (cuda_fp16.h): pip install nvidia-cuda-runtime")
    return dirs


def nvrtc_compile(arch: str, defines: tuple[str, ...] = ()) -> tuple[str, bytes]:
    """Compile lars_kernels.cu to a cubin with NVRTC (``defines``: extra ``NAME=VALUE``
    macros); returns (ptxas log, cubin)."""
    nvrtc = _nvrtc()
    source, _ = cuda.kernel_sources()

    def check(result, prog=None):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = _log(prog) if prog is not None else ""
            raise AssertionError(f"NVRTC failed ({err}) for {arch}:\n{log}")
        return rest[0] if len(rest) == 1 else rest

    def _log(prog) -> str:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        return buf.rstrip(b"\0 ").decode(errors="replace")

    prog = check(nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], []))
    try:
        # The options cupylars.cuda compiles with (--fmad=false), plus the -ftz=true that
        # CuPy appends to every NVRTC compile: the code checked here is the code that runs.
        options = [
            b"--std=c++17",
            b"--fmad=false",
            b"--ftz=true",
            f"--gpu-architecture={arch}".encode(),
            f"-I{source.parent}".encode(),
            *[f"-I{d}".encode() for d in _include_dirs()],
            b"--ptxas-options=-v",
            *[f"-D{d}".encode() for d in defines],
        ]
        check(nvrtc.nvrtcCompileProgram(prog, len(options), options), prog)
        log = _log(prog)
        size = check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return log, cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_CACHE: dict[tuple[str, tuple[str, ...]], tuple[str, bytes]] = {}


def _compiled(arch: str, defines: tuple[str, ...] = ()) -> tuple[str, bytes]:
    if (arch, defines) not in _CACHE:
        _CACHE[arch, defines] = nvrtc_compile(arch, defines)
    return _CACHE[arch, defines]


def _check_report(report: dict[str, dict[str, int]], arch: str, log: str) -> None:
    missing = set(cuda.kernel_names()) - set(report)
    assert not missing, f"ptxas reported no entry for {sorted(missing)} on {arch}:\n{log}"
    spilled = {k: v for k, v in report.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spilled, f"register spills on {arch}: {spilled}"


@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles_every_kernel_without_spills(arch):
    log, cubin = _compiled(arch)
    assert cubin, "NVRTC produced no cubin"
    _check_report(parse_ptxas(log), arch, log)


@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles_without_warnings(arch):
    log, _ = _compiled(arch)
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)


def _f32_partials_archs_in_header() -> tuple[int, ...]:
    _, header = cuda.kernel_sources()
    m = re.search(
        r"#if defined\(__CUDA_ARCH__\) && \(([^\n]*)\)\n#define LARS_STATS_F32_PARTIALS 1", header.read_text()
    )
    assert m is not None, "the architecture test of LARS_STATS_F32_PARTIALS is not in lars_common.cuh"
    return tuple(int(v) // 10 for v in re.findall(r"__CUDA_ARCH__ == (\d+)", m.group(1)))


def test_f32_partials_architectures_match_the_launcher():
    assert _f32_partials_archs_in_header() == cuda.STATS_F32_PARTIALS_ARCHS


@pytest.mark.parametrize("arch", ["sm_80", "sm_86"])
def test_the_stats_accumulation_is_chosen_by_architecture(arch):
    # The default build of an architecture is the forced build of its accumulation, and
    # differs from the other one: sm_86 takes the float32 partials, sm_80 float64.
    on = int(arch[3:]) in cuda.STATS_F32_PARTIALS_ARCHS
    _, default = _compiled(arch)
    _, same = _compiled(arch, (f"LARS_STATS_F32_PARTIALS={int(on)}",))
    _, other = _compiled(arch, (f"LARS_STATS_F32_PARTIALS={int(not on)}",))
    assert default == same
    assert default != other


def _nvcc() -> str:
    path = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).exists()), None
    )
    if path is None:
        pytest.skip("nvcc not found")
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles_every_kernel_without_spills(arch, tmp_path):
    nvcc = _nvcc()
    source, _ = cuda.kernel_sources()
    cmd = [
        nvcc,
        "-std=c++17",
        "--fmad=false",  # as cupylars.cuda compiles (see nvrtc_compile)
        "-ftz=true",
        f"-arch={arch}",
        "-cubin",
        "-Xptxas=-v",
        f"-I{source.parent}",
        "-o",
        str(tmp_path / "lars.cubin"),
        str(source),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    _check_report(parse_ptxas(log), arch, log)


# ---- the launcher mirrors the header's numbers --------------------------------------------------
def _header_enums() -> dict[str, int]:
    _, header = cuda.kernel_sources()
    # The shared math header first: lars_common.cuh builds on its names.
    text = (header.parent / "lars_math.h").read_text() + header.read_text()
    values: dict[str, int] = {}
    for name, expr in re.findall(r"\b(k[A-Z]\w*)\s*=\s*([^,/\n};]+)", text):
        expr = expr.strip().rstrip(",")
        try:
            values[name] = int(eval(expr, {}, dict(values)))  # small integer expressions of earlier names
        except Exception:
            continue
    return values


def test_launcher_constants_match_the_header():
    h = _header_enums()
    assert cuda.THREADS == h["kThreads"]
    assert cuda.FINALIZE_THREADS == h["kFinalizeThreads"]
    assert plan.TILE == h["kTile"] == h["kQBlock"]
    assert plan.SUMS == h["kSums"]
    assert plan.TENSOR_FIELDS == h["kTensorFields"]
    assert plan.COEF_WORDS == h["kCoefWords"]
    # lars_set_grads' parameter struct, defined with its kernel in the source file
    source, _ = cuda.kernel_sources()
    rows = re.search(r"\bkGradPatchRows\s*=\s*(\d+)", source.read_text())
    assert rows is not None and cuda_runtime.GRAD_PATCH_ROWS == int(rows.group(1))
    # long long grad[rows]; unsigned long long vector; int first; int count (no padding)
    assert cuda_runtime.GRAD_PATCH.itemsize == 8 * cuda_runtime.GRAD_PATCH_ROWS + 16
    assert [cuda_runtime.GRAD_PATCH.fields[k][1] for k in ("grad", "vector", "first", "count")] == [
        0, 8 * cuda_runtime.GRAD_PATCH_ROWS, 8 * cuda_runtime.GRAD_PATCH_ROWS + 8,
        8 * cuda_runtime.GRAD_PATCH_ROWS + 12,
    ]
    fields = {
        "FIELD_PARAM": "kFieldParam",
        "FIELD_GRAD": "kFieldGrad",
        "FIELD_STATE": "kFieldState",
        "FIELD_ABSMAX": "kFieldAbsmax",
        "FIELD_STEP": "kFieldStep",
        "FIELD_SKIP": "kFieldSkip",
        "FIELD_HISTORY": "kFieldHistory",
        "FIELD_SIZE": "kFieldSize",
        "FIELD_FIRST_BLOCK": "kFieldFirstBlock",
        "FIELD_NUM_BLOCKS": "kFieldNumBlocks",
        "FIELD_VECTOR": "kFieldVector",
        "FIELD_KIND": "kFieldKind",
        "SWITCH_PERCENTILE": "kSwitchPercentile",
        "SWITCH_TRUST": "kSwitchTrust",
        "SWITCH_TRUST_CLIP": "kSwitchTrustClip",
        "SWITCH_MOMENTUM": "kSwitchMomentum",
        "SWITCH_NESTEROV": "kSwitchNesterov",
        "SWITCH_UNORM": "kSwitchUnorm",
        "NO_STATE": "kNoState",
        "STATE_32": "kState32",
        "STATE_8": "kState8",
    }
    for py, c in fields.items():
        assert getattr(plan, py) == h[c], (py, c)
    assert (h["kPolicySkip"], h["kPolicyRaise"], h["kPolicyPropagate"]) == (0, 1, 2)
    from cupylars.config import NONFINITE_POLICIES

    assert NONFINITE_POLICIES == ("skip", "raise", "propagate")
    assert plan.CHUNK_SIZE % plan.TILE == 0


# ---- the step-configuration struct: one C layout, mirrored once in Python ---------------------
def _step_config_layout_program() -> str:
    """C++ that prints sizeof(lars::StepConfig), then each field's name and offset."""
    fields = "".join(
        f'  std::printf("{name} %zu\\n", offsetof(lars::StepConfig, {name}));\n'
        for name in plan.STEP_CONFIG.names
    )
    return (
        "#define LARS_HOST_ONLY\n#include <cstddef>\n#include <cstdio>\n#include \"lars_math.h\"\n"
        "int main() {\n"
        '  std::printf("sizeof %zu\\n", sizeof(lars::StepConfig));\n'
        f"{fields}"
        "  return 0;\n}\n"
    )


def test_step_config_mirrors_the_header_for_the_host_compiler(tmp_path):
    """plan.STEP_CONFIG has the offsets and size the host compiler gives lars::StepConfig (the
    native backend reads it through a pointer; the emulated kernels take it by value)."""
    cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no host C++ compiler")
    source, _ = cuda.kernel_sources()
    program = tmp_path / "layout.cpp"
    program.write_text(_step_config_layout_program())
    binary = tmp_path / "layout"
    built = subprocess.run(
        [cxx, "-std=c++17", f"-I{source.parent}", str(program), "-o", str(binary)],
        capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 0, built.stderr
    printed = dict(line.split() for line in subprocess.run(
        [str(binary)], capture_output=True, text=True, check=True
    ).stdout.splitlines())
    assert int(printed.pop("sizeof")) == plan.STEP_CONFIG.itemsize
    # every field of the C struct is in the mirror, at the same offset
    assert {name: int(at) for name, at in printed.items()} == {
        name: plan.STEP_CONFIG.fields[name][1] for name in plan.STEP_CONFIG.names
    }
    c_fields = re.search(r"struct StepConfig \{(.*?)\};", (source.parent / "lars_math.h").read_text(), re.S)
    assert c_fields is not None
    declared = re.findall(r"^\s*(?:double|int) (\w+);", c_fields.group(1), re.M)
    assert declared == list(plan.STEP_CONFIG.names)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_step_config_mirrors_the_header_for_nvrtc(arch):
    """The same layout as NVRTC compiles it (the GPU kernels take the struct by value)."""
    nvrtc = _nvrtc()
    source, _ = cuda.kernel_sources()
    offsets = {name: plan.STEP_CONFIG.fields[name][1] for name in plan.STEP_CONFIG.names}
    asserts = "".join(
        f'static_assert(offsetof(lars::StepConfig, {name}) == {at}, "{name}");\n'
        for name, at in offsets.items()
    )
    program = (
        f'#include "lars_math.h"\n#define offsetof(T, f) __builtin_offsetof(T, f)\n{asserts}'
        f'static_assert(sizeof(lars::StepConfig) == {plan.STEP_CONFIG.itemsize}, "sizeof");\n'
    )
    err, prog = nvrtc.nvrtcCreateProgram(program.encode(), b"layout.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        options = [b"--std=c++17", f"--gpu-architecture={arch}".encode(), f"-I{source.parent}".encode()]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def test_step_config_carries_the_config():
    cfg = LarsConfig(
        lr=0.5, momentum=0.9, dampening=0.25, weight_decay=1e-4, max_unorm=0.03, percentile_clipping=7,
        trust_coefficient=0.002, trust_clip=True, eps=1e-6, nonfinite="propagate",
    )
    step = plan.step_config(cfg)
    assert step.shape == (1,) and step.dtype == plan.STEP_CONFIG
    assert step[0].tolist() == (
        0.5, 0.9, 0.25, 1e-4, 0.002, 1e-6, 0.03, 7,
        plan.SWITCH_PERCENTILE | plan.SWITCH_TRUST | plan.SWITCH_TRUST_CLIP | plan.SWITCH_MOMENTUM
        | plan.SWITCH_UNORM,
        2,
    )


def test_every_entry_point_is_in_the_source():
    source, _ = cuda.kernel_sources()
    text = source.read_text()
    formats = re.findall(r"^LARS_FORMAT\((\w+), lars::\w+\)", text, re.M)
    stats = re.findall(r"LARS_STATS\(FMT_NAME, FMT, (\w+), lars::(\w+), (true|false)\)", text)
    update = re.findall(r"LARS_UPDATE\(FMT_NAME, FMT, (\w+), lars::\w+\)", text)
    assert formats == list(plan.FORMAT_NAMES)
    assert [name for name, _, _ in stats] == list(plan.STATS_NAMES)
    assert update == list(plan.STATE_NAMES)
    names = {f"lars_stats_{f}_{s}" for f in formats for s, _, _ in stats}
    names |= {f"lars_update_{f}_{s}" for f in formats for s in update}
    singles = {"lars_finalize", "lars_unorm_exact", "lars_unorm_finalize", "lars_set_grads"}
    for single in singles:
        pattern = rf"__global__ void __launch_bounds__\([^)]*\)\s*{single}\("
        assert len(re.findall(pattern, text)) == 1, single
    assert names | singles == set(cuda.kernel_names())
    # what each stats variant reads, as plan.build_tables picks it: p unless "gradonly",
    # m exactly in the state variants
    reads = {name: (mode, need_p == "true") for name, mode, need_p in stats}
    assert reads == {
        "gradonly": ("kNoState", False),
        "nostate": ("kNoState", True),
        "state32": ("kState32", True),
        "state8": ("kState8", True),
    }


if __name__ == "__main__":  # print the register / spill table
    for arch in sys.argv[1:] or ARCHS:
        log, _ = nvrtc_compile(arch)
        print(f"{arch}: kernel, registers, stack bytes, spill stores, spill loads")
        for name, r in sorted(parse_ptxas(log).items()):
            print(f"  {name:28s} {r['regs']:4d} {r['stack']:4d} {r['spill_stores']:4d} {r['spill_loads']:4d}")
