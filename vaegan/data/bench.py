"""`vaegan bench data`: how fast the reader turns shards into decoded training batches."""

from __future__ import annotations

import time

from vaegan.data.manifest import check_shards
from vaegan.data.reader import make_loader


def bench_loader(shards: str, *, workers: int = 0, batches: int = 50, batch_size: int = 64,
                 split: str = "train", s3_endpoint: str = "", flip: bool = False,
                 cache_mb: float = 0) -> dict:
    """Read `batches` batches from one loader, epoch after epoch as training does, and time
    them. images_per_s counts from the first batch on (steady state: worker start-up and the
    first shard fetch excluded); images_per_s_with_startup counts from the call. With
    `cache_mb` the epochs after the first come (partly) from the decode cache."""
    check_shards(shards, s3_endpoint)
    t0 = time.perf_counter()
    t_first, images, done = None, 0, 0
    loader = make_loader(shards, batch_size=batch_size, split=split, loader_workers=workers, flip=flip,
                         s3_endpoint=s3_endpoint, epochs=None, cache_mb=cache_mb)
    for x in loader:
        if t_first is None:
            t_first = time.perf_counter()
        else:
            images += len(x)
        done += 1
        if done == batches:
            break
    t_end = time.perf_counter()
    steady = t_end - t_first
    return {
        "shards": shards, "split": split, "workers": workers, "batch_size": batch_size, "batches": done,
        "epochs": round(done / len(loader), 2), "cache_mb": cache_mb,
        "image_shape": list(loader.image_shape), "seconds": round(t_end - t0, 3),
        "startup_s": round(t_first - t0, 3),
        "images_per_s": round(images / steady, 1) if images and steady > 0 else None,
        "images_per_s_with_startup": round(done * batch_size / (t_end - t0), 1),
    }
