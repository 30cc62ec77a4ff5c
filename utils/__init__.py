import ctypes
import logging
import os
import sys

# The phases run torch on CPU cores that several processes share. OpenMP threads that spin while they
# wait for work then steal each other's time: measured here with 2 threads under load, training ran
# 3-4x slower than with 1 thread, and 1.5x faster than 1 thread once waiting passively (evaluation
# passes 7x faster). The policy is read when torch loads its OpenMP runtime, so it is set on the first
# import of this package, before any phase imports torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks for large tensors instead of returning them to the kernel.

    By default a block over 32 MB (the logits of one batch: 4 x 259 x 49k vocabulary in fp32 is 200 MB)
    is mmap'ed when allocated and unmapped when freed, so every training step faults its pages in again
    and the kernel zeroes them: a third of SFT's CPU time went to the system. Served from the heap and
    kept there, they are reused: scripts/bench_sft.py measured 17.2 -> 12.8 s/step on the CPU recipe,
    peak memory +4%. ECG_MALLOC_TUNING=0 turns this off.
    """
    if os.environ.get("ECG_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc; other C libraries (musl) have no mallopt
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GB from the heap
                and mallopt(m_trim_threshold, 1 << 32)  # keep up to 4 GB of freed heap for reuse
                and mallopt(m_top_pad, 1 << 30))  # grow the heap in 1 GB steps (address space only: pages come on use)


MALLOC_TUNED = _keep_freed_memory()


# bitsandbytes (imported by peft on every run) warns at import on a machine without CUDA that the optional
# `kernels` package for its CPU 4-bit matmul is missing. Nothing here runs 4-bit on CPU (a run that asks for
# quantization without CUDA is refused), so the warning only spoils the one-line errors the scripts promise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
