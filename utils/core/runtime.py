"""Process tuning for the phase scripts: one explicit call, :func:`configure_process`, made by each script
before it imports torch. Importing any module of ``utils`` changes nothing in the process."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)


def _keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks for large tensors instead of returning them to the kernel.

    By default a block over 32 MB (the logits of one batch: 4 x 259 x 49k vocabulary in fp32 is 200 MB)
    is mmap'ed when allocated and unmapped when freed, so every training step faults its pages in again
    and the kernel zeroes them: a third of SFT's CPU time went to the system. Served from the heap and
    kept there, they are reused (scripts/bench_sft.py on the CPU recipe: 17.2 -> 12.8 s/step when first
    measured; 13.4 -> 12.6 s/step, peak memory +4%, on 2026-12-03; docs/EXPERIMENTS.md). ECG_MALLOC_TUNING=0
    turns this off.
    """
    if os.environ.get("ECG_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc; other C libraries (musl) have no mallopt
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # mallopt(int, int): a larger value would wrap around
    return bool(mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GB from the heap
                and mallopt(m_trim_threshold, (1 << 31) - 1)  # keep up to 2 GB of freed heap for reuse
                and mallopt(m_top_pad, 1 << 30))  # grow the heap in 1 GB steps (address space only: pages come on use)


_CONFIGURED: dict[str, bool | str] = {}


def configure_process() -> dict[str, bool | str]:
    """Tune this process for the phases; call it first thing, before anything imports torch. Idempotent.

    * the OpenMP wait policy (unless the user set ``OMP_WAIT_POLICY``): ``PASSIVE`` when this process is one of
      several launched together on one machine (``WORLD_SIZE`` > 1: ``torchrun``, ``accelerate launch``),
      else the runtime's own default, which spins briefly before sleeping, as plain torch and TRL run. Threads
      that spin while they wait steal time from another process on the same cores (2 threads under load:
      training 3-4x slower than 1 thread; decoding 2.5x slower); a process alone on its cores waits ~20% less
      between operators when they spin (docs/EXPERIMENTS.md, stops 26 and 37). The phases run alone or, in
      ``make demo``'s two lanes, on separate halves of the cores; several processes that share cores should
      set ``OMP_WAIT_POLICY=PASSIVE`` or ``--num-threads 1``. The OpenMP runtime reads the policy when torch
      loads it, hence before the import.
    * glibc keeps freed large blocks for reuse (:func:`_keep_freed_memory`).
    * bitsandbytes' import-time warning about its optional CPU kernels is silenced: nothing here runs
      4-bit on CPU (quantization without CUDA is refused), and it would spoil the one-line errors.

    Returns what was done (``{"omp_wait_policy": "PASSIVE" | "ACTIVE" | "default", "malloc_tuned": ...}``).
    """
    if not _CONFIGURED:
        if "torch" in sys.modules:
            log.debug("configure_process after torch was imported: the OpenMP wait policy may not take effect")
        if "OMP_WAIT_POLICY" not in os.environ and launched_world_size() > 1:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _CONFIGURED["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "").upper() or "default"
        _CONFIGURED["malloc_tuned"] = _keep_freed_memory()
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return dict(_CONFIGURED)


def launched_world_size() -> int:
    """How many processes the launcher started together (``WORLD_SIZE``: accelerate, torchrun), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch's operators (0: leave torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


def launched_processes(timeout_minutes: float | None = None):
    """accelerate's ``PartialState`` when the script was started as several processes (``accelerate launch``,
    ``torchrun``: WORLD_SIZE > 1), else None. CPU processes need ``cpu=True`` to form a (gloo) group.
    ``timeout_minutes``: how long a process waits for the others at a collective call (torch's default:
    10 minutes on GPUs, 30 on CPUs). Set the thread count after this call: accelerate's CPU setup resets it
    when OMP_NUM_THREADS is unset."""
    if launched_world_size() <= 1:
        return None
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    return PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def machine_summary() -> dict:
    """What the machine a figure was measured on is: CPU model, cores, the vector extensions torch uses and
    whether the CPU has native bf16 (AVX512-BF16 or AMX), and the GPUs. Speed figures differ between
    machines of the same kind; every benchmark prints this beside its numbers."""
    import platform

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:  # the first processor's lines are enough
                if line.startswith("model name") and ":" in line:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                elif not line.strip() and flags:
                    break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count()}
    try:
        import torch

        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            out["gpu_bf16"] = torch.cuda.is_bf16_supported()
    except ImportError:
        pass
    if flags:
        out["avx512"] = "avx512f" in flags
        out["native_bf16"] = bool({"avx512_bf16", "amx_bf16"} & flags)
    return out


def format_machine(m: dict | None = None) -> str:
    """:func:`machine_summary` as one line, e.g. ``AMD EPYC 7B13, 2 cores (2 threads), AVX2, no AVX-512, no
    native bf16``."""
    m = m or machine_summary()
    parts = [f"{m['cpu']}, {m['cores']} cores" + (f" ({m['threads']} torch threads)" if "threads" in m else "")]
    if "torch_cpu_capability" in m:
        parts.append(f"torch uses {m['torch_cpu_capability']}")
    if "avx512" in m:
        parts.append("AVX-512" if m["avx512"] else "no AVX-512")
        parts.append("native bf16" if m["native_bf16"] else "no native bf16")
    if m.get("gpus"):
        parts.append(f"GPU {m['gpus'][0]} x{len(m['gpus'])}" + (" (bf16)" if m.get("gpu_bf16") else ""))
    return ", ".join(parts)


def machine_bound(dtype, device: str = "cpu", trials: int = 5) -> dict:
    """Memory bandwidth (GB/s, a large copy) and matmul speed (GFLOP/s) of this machine right now, in the
    generation dtype: what :func:`decode_bound` turns into tokens/s. On CPU the GEMM is decode-sized (a
    small one is what a CPU decode step runs); on a GPU it is large, since a small one measures launch
    latency rather than the tensor cores, and decode there is bound by bandwidth anyway. Each is the best of
    ``trials`` measurements, as peak figures are taken (STREAM's best of N): on a 2-core VM single ones
    moved from 104 to 154 GFLOP/s within one process, and a low bound flatters the share of it reached."""
    import time

    import torch

    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # 256 MiB a buffer: well past the CPUs' caches; 1 GiB on a GPU (its L2 is up to ~60 MB, copies are fast)
    a = torch.empty((256 if cuda else 64) * 2**20, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    m, k, n = (4096, 4096, 4096) if cuda else (256, 1024, 4096)
    x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    b.copy_(a)
    torch.nn.functional.linear(x, w)
    sync()
    bw = flops = 0.0
    for _ in range(max(1, trials)):
        t = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        sync()
        bw = max(bw, 5 * 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(x, w)
        sync()
        flops = max(flops, 10 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    del a, b, x, w
    return {"bandwidth_gb_s": round(bw, 1), "matmul_gflop_s": round(flops, 1)}


def _weight_size(model, dtype=None) -> tuple[int, int]:
    """(bytes, count) of the weights a decode step reads: all but the LoRA ones (merged for generation),
    at ``dtype``'s size when the decoder multiplies in another dtype than the weights' own."""
    params = [p for n, p in model.named_parameters() if "lora_" not in n]
    size = None if dtype is None else dtype.itemsize
    return sum(p.numel() * (size or p.element_size()) for p in params), sum(p.numel() for p in params)


def decode_bound(model, rows: float, bound: dict, dtype=None) -> float:
    """Tokens/s a decoder of ``model`` could reach with ``rows`` sequences decoded together: one decode
    step reads every weight once for all rows (bandwidth) and costs 2 FLOPs per weight per row (matmul
    speed); the lower of the two. LoRA weights are not counted (merged for generation). ``dtype``: the dtype
    the decoder multiplies in, when not the weights' own (``bound`` must be measured in it too)."""
    weight_bytes, n_params = _weight_size(model, dtype)
    return min(rows * bound["bandwidth_gb_s"] * 1e9 / weight_bytes, bound["matmul_gflop_s"] * 1e9 / (2 * n_params))


def completions_bound(model, steps: int, tokens: int, bound: dict, dtype=None) -> float:
    """Tokens/s a decoder of ``model`` could reach on completions sampled together in batches whose longest
    completions sum to ``steps`` tokens, all completions to ``tokens``: every decode step reads every weight
    once, however few rows are still going (bandwidth), and every token costs 2 FLOPs a weight (matmul
    speed); the time is at least the larger of the two. :func:`decode_bound` at the batch's rows assumes
    every row goes on to the end; on-policy sampling (GRPO) cannot refill the rows that finish, so the steps
    of a batch's longest completion at a few rows are part of any decoder's work. Taking the larger of the
    two sums, rather than the sum of each step's larger one, errs towards a higher bound."""
    weight_bytes, n_params = _weight_size(model, dtype)
    seconds = max(steps * weight_bytes / (bound["bandwidth_gb_s"] * 1e9),
                  tokens * 2 * n_params / (bound["matmul_gflop_s"] * 1e9))
    return tokens / seconds if seconds else 0.0
