"""What machine a benchmark ran on, printed above its table.

Reads `/proc/cpuinfo` itself:
importing the package imports Keras, which fixes the backend before
`cpu_kernels.py` chooses one.
"""

import os


def describe_cpu():
    """The CPU's model and its bfloat16 instructions: the kernel ranking
    differs between, e.g., AMX Xeons and AVX2-only EPYCs."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    native = sorted(flags & {"avx512_bf16", "amx_bf16"}) or ["none"]
    return f"{model}, {os.cpu_count()} cores, bfloat16 instructions: {', '.join(native)}"
