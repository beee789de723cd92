"""vaegan: train the VAE/GAN of Larsen et al. (ICML 2016) on a Ray cluster.

The public surface is small and imported lazily, so `import vaegan` stays light (no torch,
Ray or MLflow until used):

    from vaegan import VAEGAN, load_config, preset, PRESETS
    from vaegan import load_model   # a registered model: models:/NAME@champion
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vaegan")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

_LAZY = {
    "VAEGAN": "vaegan.model",
    "Config": "vaegan.config",
    "load_config": "vaegan.config",
    "preset": "vaegan.config",
    "PRESETS": "vaegan.config",
    "TrainStep": "vaegan.step",
    "load_model": "vaegan.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vaegan' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
