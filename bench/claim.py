"""claim_due_tasks latency with 100,000 due tasks, beside 1,000,000 vs 10,000 terminal rows.

The claim path must ignore history: the median with a million finished tasks
should stay within 2x of the median with ten thousand.

    python -m bench.claim [--terminal 1000000] [--due 100000] [--claims 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg

from bench.cluster import fill_tasks, migrated_databases


def _median_claim_ms(url: str, claims: int, batch: int) -> tuple[float, float]:
    timings = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(claims):
            start = time.perf_counter()
            rows = conn.execute("select task_id from taskman.claim_due_tasks(%s, %s, 300)",
                                (f"bench-{i}", batch)).fetchall()
            timings.append((time.perf_counter() - start) * 1000)
            assert len(rows) == batch
    timings.sort()
    return statistics.median(timings), timings[int(len(timings) * 0.95)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terminal", type=int, default=1_000_000)
    parser.add_argument("--small-terminal", type=int, default=10_000)
    parser.add_argument("--due", type=int, default=100_000)
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()

    with migrated_databases("bench_large", "bench_small") as urls:
        started = time.perf_counter()
        fill_tasks(urls["bench_large"], terminal=args.terminal, due=args.due)
        fill_tasks(urls["bench_small"], terminal=args.small_terminal, due=args.due)
        print(f"loaded in {time.perf_counter() - started:.1f}s")
        large = _median_claim_ms(urls["bench_large"], args.claims, args.batch)
        small = _median_claim_ms(urls["bench_small"], args.claims, args.batch)

    print(f"claim_due_tasks(batch={args.batch}), {args.due:,} due, {args.claims} claims each")
    print(f"  {args.terminal:>9,} terminal rows: median {large[0]:7.2f} ms   "
          f"p95 {large[1]:7.2f} ms")
    print(f"  {args.small_terminal:>9,} terminal rows: median {small[0]:7.2f} ms   "
          f"p95 {small[1]:7.2f} ms")
    print(f"  ratio (large / small median): {large[0] / small[0]:.2f}x   (target <= 2x)")


if __name__ == "__main__":
    main()
