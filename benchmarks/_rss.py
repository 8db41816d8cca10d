"""Resident memory of this process, for the benchmarks that measure it."""

import resource


def rss_bytes(peak=True):
    """Peak (`VmHWM`) or current (`VmRSS`) resident bytes of this process.

    Read from /proc rather than `getrusage`, whose maximum survives `exec`:
    a measuring child process would report its parent's RSS at the fork as
    its own peak (a 0.45 GB child read as ~1 GB beside a 1 GB parent).
    """
    field = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: the peak only, as getrusage reports it (KiB on Linux)
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
