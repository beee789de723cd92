"""Shared fixtures: one definition of each. Integration fixtures (servers, clusters) live in
servers.py, with the free-port and wait-for-server helpers; they are imported here so every
test module sees them."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from servers import mlflow_server, ray_local, s3_bucket, s3_server  # noqa: F401  (fixtures)

from vaegan.config import load_config

# Two test modules run at once (pytest-xdist), each with its own local Ray: a Ray whose own
# processes run at idle priority (cluster.IdleRay, for a machine given to one training) waits
# for cores behind the other module's training: with it the suite took 1,299-1,452 s against
# 1,199 without (the IdleRay test alone: 91 s beside another module, 19 s on a quiet machine).
# Off here, in this process and the subprocesses it starts; tests/test_console.py checks it.
os.environ.setdefault("VAEGAN_IDLE_RAY", "0")
# Likewise a training step at a raised priority (vaegan.threads.raise_this_thread, where the OS
# allows it) would take the cores from the other module's servers; tests/test_threads.py checks it.
os.environ.setdefault("VAEGAN_STEP_NICE", "0")


@pytest.fixture
def debug_cfg():
    """The debug preset in fp32: exact gradient comparisons need deterministic precision."""
    return load_config("debug", overrides=["train.precision=fp32"])


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """mnist5k as 32x32 shards (4,500 train + 500 val digits), prepared once for the session."""
    from vaegan.data import prepare

    out = tmp_path_factory.mktemp("shards") / "mnist5k"
    prepare("mnist5k", str(out), image_size=32, channels=1, shard_size=1000, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def featurizer(mnist_shards, tmp_path_factory):
    """A quickly trained digit featurizer (a folder) for training runs that evaluate: what
    its FIDs are does not matter to those tests, only that evaluation runs."""
    from vaegan.featurizer import train_featurizer

    out = tmp_path_factory.mktemp("featurizer")
    train_featurizer(mnist_shards, "digit", out, steps=30)
    return str(out)


def _make_folder(root: Path, n: int, size: int = 16, *, labels: bool = True, seed: int = 0) -> Path:
    """n random RGB PNGs (size x size) in two subfolders, with labels.csv (idx, parity)."""
    rng = np.random.default_rng(seed)
    rows = ["file,idx,odd"]
    for i in range(n):
        rel = f"{'a' if i % 2 else 'b'}/img{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(root / rel)
        rows.append(f"{rel},{i},{i % 2}")
    if labels:
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def make_folder():
    """make_folder(root, n, size=16, *, labels=True, seed=0): an image folder source for
    `prepare` (`folder:ROOT`): n random RGB PNGs named a/imgNNN.png (odd i) and b/imgNNN.png
    (even i), and labels.csv with the attributes idx = i and odd = i % 2."""
    return _make_folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# `make test` runs the modules on two pytest-xdist workers, a module to a worker (loadfile, so
# a module's fixtures start once). One module at a time left the 2 cores partly idle while Ray's
# processes started and polled; two at a time keep them busy: 26.5 -> 22.8 min (2026-12-01).
# A free worker takes the next module in collection order, so the longest go first and both
# workers end together. Seconds with one worker (`--durations=0`); the rest take under 40 s.
MODULE_SECONDS = {"test_tune.py": 297, "test_faults.py": 194, "test_registry.py": 186,
                  "test_cluster.py": 160, "test_secrets.py": 116, "test_tracking_outage.py": 104,
                  "test_train.py": 99, "test_console.py": 88, "test_storage_outage.py": 88,
                  "test_bench.py": 67}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))  # stable: in-module order kept
