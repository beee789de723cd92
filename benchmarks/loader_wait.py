"""What the training thread waits for a batch that the loader has ready: `next(loader)` on
the bundled mnist5k at the mnist32 preset's batch, with something between two batches as a
training step would be.

    .venv/bin/python benchmarks/loader_wait.py --loader-workers 0,1 --between busy,idle,none

`busy` keeps 2 threads on matrix products for --gap-ms (a step's load, which also evicts the
reader's code and data from the caches), `idle` sleeps as long, `none` asks for the next batch
at once. The first epoch (decoding) and the later ones (the decode cache) are reported apart.
No Ray, no DDP: the reader alone, at the training thread's niceness.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vaegan.data.reader import make_loader
from vaegan.threads import raise_this_thread


def waits(loader_workers: int, between: str, batches: int, gap_s: float) -> list[float]:
    loader = make_loader("data/mnist5k", batch_size=32, loader_workers=loader_workers, epochs=None,
                         cache_mb=256, seed=0)
    a, out = torch.randn(700, 700), []
    it = iter(loader)
    for _ in range(batches):
        t = time.perf_counter()
        next(it)
        out.append(time.perf_counter() - t)
        if between == "busy":
            t = time.perf_counter()
            while time.perf_counter() - t < gap_s:
                a @ a
        elif between == "idle":
            time.sleep(gap_s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loader-workers", default="0,1", help="comma-separated data.loader_workers values")
    ap.add_argument("--between", default="busy,idle,none", help="comma-separated: busy, idle, none")
    ap.add_argument("--batches", type=int, default=420, help="3 epochs of mnist5k's 140 batches")
    ap.add_argument("--gap-ms", type=float, default=70.0, help="a step's time (mnist32, 2 threads)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    raise_this_thread()
    for r in range(args.rounds):
        for workers in (int(w) for w in args.loader_workers.split(",")):
            for between in args.between.split(","):
                w = waits(workers, between, args.batches, args.gap_ms / 1000)
                first, later = w[:140], w[140:]
                print(f"round {r + 1}  loader_workers={workers}  between={between:<5}  "
                      f"first epoch {statistics.median(first) * 1e3:6.3f} ms (median)  "
                      f"later {statistics.median(later) * 1e3:6.3f} ms (median), "
                      f"{statistics.mean(later) * 1e3:6.3f} (mean)", flush=True)


if __name__ == "__main__":
    main()
