"""Peak resident memory of this process.

getrusage's ru_maxrss survives exec on Linux: a job started from a large parent reports the
parent's size. VmHWM belongs to the process's own address space, so it is the job's own peak.
"""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
