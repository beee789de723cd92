"""The data layer: sources -> WebDataset shards (local or S3) -> per-rank training batches.

    from vaegan.data import prepare, make_loader, check_shards, read_manifest, DataError

    prepare("mnist5k", "s3://bucket/mnist5k")              # or `vaegan data prepare`
    check_shards(url)                                       # pre-flight before training
    loader = make_loader(url, batch_size=64, rank=r, world_size=n, epoch=e)
    images = read_split(url, 500, "val")                      # the first 500, in reader order

Modules: `sources` (folder, celeba, mnist5k, synthetic-faces), `faces` (the synthetic face
generator), `shards` (writer + manifest), `manifest` (its format, read and check), `reader`
(the WebDataset pipeline), `storage` (local/S3 via fsspec/s3fs; transient-error backoff),
`retrying_fs` (the pyarrow filesystem over s3fs that Ray Train checkpoints through), `bench`.

Imports are lazy so `from vaegan.data import DataError` (the CLI) does not pull in torch.
"""

from importlib import import_module

from vaegan.data.errors import DataError, DataWarning

_LAZY = {
    "make_loader": "vaegan.data.reader",
    "ShardLoader": "vaegan.data.reader",
    "read_split": "vaegan.data.reader",
    "covering_batch_size": "vaegan.data.reader",
    "read_manifest": "vaegan.data.manifest",
    "check_shards": "vaegan.data.manifest",
    "prepare": "vaegan.data.shards",
    "generate_synthetic_faces": "vaegan.data.faces",
    "bench_loader": "vaegan.data.bench",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vaegan.data' has no attribute {name!r}")


__all__ = ["DataError", "DataWarning", *_LAZY]
