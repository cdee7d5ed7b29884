"""Nested state as JSON plus an ``.npz`` of its arrays: a checkpoint that opening cannot
run code from (unlike a pickle), that a person can read, and that is refused, naming the
file and the reason, when it is truncated, garbage or someone else's.

A *tree* is built of ``None``, bools, ints, floats, strings, lists, tuples, sets, dicts
(any of these as keys) and numpy arrays (numeric or bool). :func:`write_state` writes

- ``<name>.json``: ``{"format": ..., "arrays": {"file": ..., "sha256": ...}, "state": ...}``,
  where the state is plain JSON with tagged objects for what JSON lacks
  (``{"__tuple__": [...]}``, ``{"__set__": [...]}``, ``{"__items__": [[key, value], ...]}``
  for dicts whose keys are not all plain strings, ``{"__float__": "nan"}``, and
  ``{"__array__": "a3"}`` for the array stored as ``a3``);
- ``<name>.<digest>.npz``: the arrays, read back with ``allow_pickle=False``.

The ``.npz`` is written first under a name of its own digest, then the ``.json`` (the
commit point: a crash in between leaves the previous pair intact), then older ``.npz``
files are removed. Both writes are atomic (:mod:`.atomic`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kta_flwr.storage.atomic import write_bytes_atomic, write_text_atomic

_TAGS = ("__tuple__", "__set__", "__items__", "__float__", "__array__")


class StateFileError(ValueError):
    """A state file cannot be used; the message names the file and the reason."""


def encode(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``tree`` as JSON-able values; its numpy arrays move into ``arrays`` (name -> array).

    Raises:
        TypeError: a value of another type (an object array, a class instance, ...).
    """
    if tree is None or isinstance(tree, (bool, str)):
        return tree
    if isinstance(tree, (int, np.integer)) and not isinstance(tree, np.bool_):
        return int(tree)
    if isinstance(tree, (float, np.floating)):
        value = float(tree)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(tree, np.bool_):
        return bool(tree)
    if isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise TypeError("object arrays cannot be stored without pickle")
        name = f"a{len(arrays)}"
        arrays[name] = tree
        return {"__array__": name}
    if isinstance(tree, tuple):
        return {"__tuple__": [encode(v, arrays) for v in tree]}
    if isinstance(tree, (set, frozenset)):
        return {"__set__": [encode(v, arrays) for v in sorted(tree)]}
    if isinstance(tree, list):
        return [encode(v, arrays) for v in tree]
    if isinstance(tree, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: encode(v, arrays) for k, v in tree.items()}
        return {"__items__": [[encode(k, arrays), encode(v, arrays)] for k, v in tree.items()]}
    raise TypeError(f"cannot store a {type(tree).__name__} in a state file")


def decode(value: Any, arrays: Mapping[str, np.ndarray], where: str = "state") -> Any:
    """The tree :func:`encode` made ``value`` from.

    Raises:
        ValueError: a malformed tag or a missing array, naming where in the tree.
    """
    if isinstance(value, list):
        return [decode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    tags = [k for k in value if k.startswith("__")]
    if not tags:
        return {k: decode(v, arrays, f"{where}.{k}") for k, v in value.items()}
    if len(value) != 1 or tags[0] not in _TAGS:
        raise ValueError(f"{where}: unknown tag {tags[0]!r}")
    tag, inner = tags[0], value[tags[0]]
    if tag == "__array__":
        if not isinstance(inner, str) or inner not in arrays:
            raise ValueError(f"{where}: array {inner!r} is not in the .npz")
        return arrays[inner]
    if tag == "__float__":
        if inner not in ("nan", "inf", "-inf"):
            raise ValueError(f"{where}: {inner!r} is not a non-finite float")
        return float(inner)
    if not isinstance(inner, list):
        raise ValueError(f"{where}: {tag} must hold a list")
    items = [decode(v, arrays, f"{where}[{i}]") for i, v in enumerate(inner)]
    if tag == "__tuple__":
        return tuple(items)
    if tag == "__set__":
        return set(items)
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in items):
        raise ValueError(f"{where}: __items__ must hold [key, value] pairs")
    return {_hashable(k): v for k, v in items}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def write_state(path: Path, tree: Any, *, format_name: str) -> None:
    """Write ``tree`` as ``path`` (``.json``) and its arrays beside it (``.npz``), atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    state = encode(tree, arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    digest = hashlib.sha256(blob).hexdigest()
    npz = path.with_name(f"{path.stem}.{digest[:16]}.npz")
    write_bytes_atomic(npz, blob)
    document = {"format": format_name, "arrays": {"file": npz.name, "sha256": digest}, "state": state}
    write_text_atomic(path, json.dumps(document, allow_nan=False))
    for old in path.parent.glob(f"{path.stem}.*.npz"):
        if old.name != npz.name:
            old.unlink(missing_ok=True)


def read_state(path: Path, *, format_name: str) -> Any:
    """The tree in ``path`` (``.json``) and its ``.npz``.

    Raises:
        StateFileError: naming the file and why it cannot be used: unreadable, not JSON,
            another format, an ``.npz`` that is missing, truncated, altered or holds
            objects, or a malformed tree.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise StateFileError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    except ValueError as err:  # UnicodeDecodeError too: binary garbage
        raise StateFileError(f"{path} is not JSON ({err}); it may be truncated or another "
                             "kind of file") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise StateFileError(f"{path} is not a {format_name} file (format {found!r})")
    arrays = _read_arrays(path, document.get("arrays"))
    try:
        return decode(document.get("state"), arrays)
    except ValueError as err:
        raise StateFileError(f"{path}: {err}") from None


def _read_arrays(path: Path, entry: Any) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` that ``entry`` (``{"file", "sha256"}``) names, checked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
            or not isinstance(entry.get("sha256"), str):
        raise StateFileError(f"{path}: field 'arrays' must name a file and its sha256")
    name = entry["file"]
    if Path(name).name != name or not name.endswith(".npz"):
        raise StateFileError(f"{path}: field 'arrays' names {name!r}, not an .npz beside it")
    npz = path.with_name(name)
    try:
        blob = npz.read_bytes()
    except OSError as err:
        raise StateFileError(f"{npz} (named by {path.name}) cannot be read: {err}") from None
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise StateFileError(f"{npz} does not match {path.name} (its SHA-256 differs): it was "
                             "truncated, changed, or belongs to another state file")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as loaded:
            return {key: loaded[key] for key in loaded.files}
    except Exception as err:  # pylint: disable=broad-except  # a hostile file never crashes us
        raise StateFileError(f"{npz} cannot be read: {type(err).__name__}: {err}") from None
