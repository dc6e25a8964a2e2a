"""Shared pieces of the benchmarks: the repo on sys.path, the machine, peaks, timing and tables."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks run as scripts: import train.py and dataset.py from the repo

import torch  # noqa: E402

DEFAULT_DATA_DIR = str(ROOT.parent / "shared" / "carvana")
# Dense bf16 tensor-core peaks (no sparsity) of the GPUs the project is lent.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
# bf16 FLOP per cycle per core: one 512-bit VDPBF16PS a cycle is 16 lanes x 2 products x 2 (mul+add)
# = 64 (Zen 4 runs it on two 256-bit pipes); AMX tiles on Intel Sapphire Rapids and later do 1024.
CPU_BF16_FLOP_PER_CYCLE = {"amx_bf16": 1024, "avx512_bf16": 64}
# fp32 FLOP per cycle per core: two 256-bit FMA pipes (8 lanes x 2 x 2), as on Zen 3 and Zen 4 (which splits
# an AVX-512 FMA over both). Intel cores with two 512-bit FMA units do 64: pass --peak-tflops there.
CPU_FP32_FLOP_PER_CYCLE = 32
# dtype -> (its name, {the /proc/cpuinfo flag of units for it: FLOP per cycle per core}), the best units first
CPU_FLOP_PER_CYCLE = {torch.bfloat16: ("bf16", CPU_BF16_FLOP_PER_CYCLE),
                      torch.float32: ("fp32", {"fma": CPU_FP32_FLOP_PER_CYCLE})}


def cpu_info() -> dict[str, Any]:
    """CPU model, cores this process may use, clock (MHz from /proc/cpuinfo) and flags."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"model": fields.get("model name", platform.processor() or "unknown"), "cores": cores,
            "mhz": float(fields.get("cpu MHz", "0") or 0), "flags": fields.get("flags", "").split()}


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including the load at the start (other users of the CPU)."""
    cpu = cpu_info()
    info = {"cpu": cpu["model"], "cores": cpu["cores"], "cpu_mhz": cpu["mhz"], "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "load_average": load_average()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> tuple[float, ...] | None:
    """1, 5 and 15 minute load averages: above the core count, others were using the CPU too."""
    return tuple(round(v, 2) for v in os.getloadavg()) if hasattr(os, "getloadavg") else None


def peak_tflops(device: torch.device, override: float | None,
                dtype: torch.dtype = torch.bfloat16) -> tuple[float | None, str]:
    """(peak dense TFLOP/s in dtype, bf16 or fp32; how it was found): the flag, the GPU's bf16 datasheet, or on a CPU
    cores x clock x FLOP/cycle."""
    if override:
        return override, f"--peak-tflops {override}"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return None, f"{dtype} on a GPU: pass --peak-tflops"
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{key} dense bf16 datasheet peak"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    if dtype not in CPU_FLOP_PER_CYCLE:
        return None, f"{dtype} on a CPU: pass --peak-tflops"
    name, per_cycle_by_flag = CPU_FLOP_PER_CYCLE[dtype]
    cpu = cpu_info()
    for flag, per_cycle in per_cycle_by_flag.items():
        if flag in cpu["flags"] and cpu["mhz"]:
            peak = cpu["cores"] * cpu["mhz"] * 1e6 * per_cycle / 1e12
            return peak, (f"{cpu['cores']} cores x {cpu['mhz'] / 1000:.2f} GHz (the clock /proc/cpuinfo states, "
                          f"nominal; boost may exceed it) x {per_cycle} {name} FLOP/cycle ({flag})")
    return None, f"no {name} units ({', '.join(per_cycle_by_flag)}) or no clock found: pass --peak-tflops"


def gemm_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs and on CPUs with bf16 units; fp32 elsewhere, where bf16 is emulated at about 1 GFLOP/s."""
    import utils
    return torch.bfloat16 if device.type == "cuda" or utils.cpu_has_bf16_units() else torch.float32


def gemm_tflops(device: torch.device, n: int | None = None, repeats: int = 5,
                dtype: torch.dtype | None = None) -> float:
    """Measured matrix-multiply rate (TFLOP/s) in dtype (default gemm_dtype): what this device sustains on the
    easiest dense work.

    A yardstick beside the assumed peak: a virtual CPU's clock in /proc/cpuinfo is its nominal one,
    and the cores may boost past it.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = dtype or gemm_dtype(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timed(lambda: a @ b, device)  # warm-up
    seconds = median([timed(lambda: a @ b, device) for _ in range(repeats)])
    return 2 * n**3 / seconds / 1e12


def fixed_batch(args: Any, device: torch.device,
                memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of train.py's --batch-size, --height and --width (seed 0) held on the device: images and
    0/1 masks, the input of a pure-compute training step."""
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.height, args.width, device=device).contiguous(
        memory_format=memory_format)
    masks = (torch.rand(args.batch_size, 1, args.height, args.width, device=device) > 0.5).float()
    return images, masks


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of fn takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def max_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def median_ratio(pairs: Sequence[dict[str, Any]], key: str, baseline: str = "baseline",
                 project: str = "project") -> float | None:
    """Median over pairs of project/baseline for one measurement: the pairs ran back to back, so the
    machine's load drifts less within a pair than between separate runs."""
    return median([p[project][key] / p[baseline][key] for p in pairs
                   if p[baseline].get(key) and p[project].get(key) is not None])


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def ratio_text(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(obj: Any, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
