"""What a run keeps on disk, written so that a crash or a hostile file does no harm:
atomic writes (:mod:`.atomic`), one writer per folder (:mod:`.lock`), and nested state as
JSON plus ``.npz`` arrays, which opening cannot run code from (:mod:`.tree`).

Pure Python and numpy: no torch, no Flower.
"""

from kta_flwr.storage.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from kta_flwr.storage.lock import FolderBusy, FolderLock, exclusive
from kta_flwr.storage.tree import StateFileError, read_state, write_state

__all__ = ["FolderBusy", "FolderLock", "StateFileError", "atomic_path", "exclusive",
           "read_state", "write_bytes_atomic", "write_state", "write_text_atomic"]
