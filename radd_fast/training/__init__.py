"""Training: the typed run config, the loop, checkpoints, optimizer, metrics, snapshot sampling."""
from ..errors import NonFiniteLossError
from .config import RunConfig
from .loop import train
from .state import META, SNAPSHOTS, atomic_save, load_checkpoint

__all__ = ["RunConfig", "train", "NonFiniteLossError", "META", "SNAPSHOTS", "atomic_save", "load_checkpoint"]
