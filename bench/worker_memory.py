"""Worker memory with many pending tasks not yet due: it must not grow with their number.

The worker only ever holds what it claimed; tasks waiting for their next poll stay in the
database. RSS is read from /proc after the worker has idled beside 10k and 100k such
tasks (target < 200 MB, and flat).

    python -m bench.worker_memory [--counts 10000 100000] [--idle 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.cluster import fill_tasks, migrated_databases
from bench.worker_bench import worker_process


def _memory_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of `pid`, in MB."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines())
    return (int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds the worker runs beside the tasks before measuring")
    args = parser.parse_args()

    names = [f"bench_memory_{count}" for count in args.counts]
    print(f"worker memory after {args.idle:.0f}s beside pending tasks not due for an hour")
    with migrated_databases(*names) as urls:
        for count, name in zip(args.counts, names, strict=True):
            fill_tasks(urls[name], future=count)
            with worker_process(urls[name]) as process:
                time.sleep(args.idle)
                rss, peak = _memory_mb(process.pid)
            print(f"  {count:>9,} tasks: RSS {rss:6.1f} MB   peak {peak:6.1f} MB"
                  "   (target < 200 MB)")


if __name__ == "__main__":
    main()
