"""Model checkpoints that outlive a run: a node's personalized model (and the state its
strategy keeps), or the server's final global model, with metadata that says what it is.

A checkpoint is one torch file (``torch.save`` of plain tensors and a metadata dict, read
back with ``weights_only=True``) written atomically (:mod:`kta_flwr.storage`). Each save
keeps the file it replaces as ``<name>.prev.pt``, so a node whose run is resumed from an
earlier round still finds that round's model. Loading checks the metadata against what
the caller expects, and the tensors against the architecture the metadata names (names,
shapes, dtypes, finite values), and refuses a mismatch with a one-line error naming the
file and the field. Where models
live and how to use them: ``docs/running.md`` ("Models that outlive the run").
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kta_flwr.config import ConfigError
from kta_flwr.storage import atomic_path
from kta_flwr.task.models import ModelSpec, build_model

FORMAT = "kta-flwr-model/1"
SUFFIX = ".pt"
PREVIOUS_SUFFIX = ".prev.pt"


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable, or does not match what the caller expects."""


@dataclass(frozen=True)
class ModelMeta:  # pylint: disable=too-many-instance-attributes
    """What a checkpoint holds and where it came from.

    ``lineage`` is the id of the run a resumed run continues (its own id otherwise);
    ``round`` the last server round the model trained in; ``rounds_trained`` how many
    rounds it trained in all, across restarts and warm starts.
    """

    architecture: str
    num_classes: int
    input_shape: tuple[int, ...]
    vocab_size: int
    finetune_layers: int
    fingerprint: str  # of the reference set (empty for a server-side global model)
    strategy: str
    partition_id: int  # -1: the server's global model
    run_id: int
    lineage: int
    round: int
    rounds_trained: int
    accuracies: dict[str, float] = field(default_factory=dict)
    saved_at: float = 0.0
    private: bool = False  # trained with DP-SGD: the DP-compatible variant of the architecture

    @property
    def spec(self) -> ModelSpec:
        """The model spec this checkpoint was built for."""
        return ModelSpec(self.input_shape, self.num_classes, self.vocab_size, self.finetune_layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (what ``torch.load(weights_only=True)`` accepts)."""
        out = dataclasses.asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: Path) -> ModelMeta:
        """Parse the metadata of ``path``.

        Raises:
            CheckpointError: a missing or malformed field, named.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names - set(raw) if n not in ("accuracies", "saved_at", "private"))
        if missing:
            raise CheckpointError(f"checkpoint {path}: metadata lacks {missing}")
        values = {k: raw[k] for k in names if k in raw}
        values["input_shape"] = tuple(int(v) for v in values["input_shape"])
        return cls(**values)


@dataclass(frozen=True)
class SavedModel:
    """A checkpoint read back: metadata, the model's state dict, extra named arrays."""

    meta: ModelMeta
    state: dict[str, torch.Tensor]
    extra: dict[str, np.ndarray]


def checkpoint_file(folder: Path, strategy: str, previous: bool = False) -> Path:
    """``<folder>/<strategy>.pt`` (or ``.prev.pt``, the one it replaced)."""
    return Path(folder) / f"{strategy}{PREVIOUS_SUFFIX if previous else SUFFIX}"


def save_checkpoint(
    path: Path, meta: ModelMeta, state: Mapping[str, torch.Tensor] | None,
    extra: Mapping[str, np.ndarray] | None = None, *, keep_previous: bool = True,
) -> None:
    """Write ``state`` (a model's state dict, or None) and ``extra`` arrays with ``meta``
    to ``path`` atomically; the file it replaces becomes ``<name>.prev.pt`` when it holds
    another round."""
    path = Path(path)
    blob = {
        "format": FORMAT,
        "meta": dataclasses.replace(meta, saved_at=time.time()).to_dict(),
        "model": {k: v.detach().cpu().clone() for k, v in (state or {}).items()},
        "extra": {k: torch.from_numpy(np.array(v)) for k, v in (extra or {}).items()},
    }
    if keep_previous and path.is_file():
        try:
            if read_checkpoint(path).meta.round != meta.round:
                os.replace(path, path.with_name(path.name[: -len(SUFFIX)] + PREVIOUS_SUFFIX))
        except CheckpointError:
            pass  # an unreadable file is simply replaced
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def read_checkpoint(path: Path) -> SavedModel:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: no file, not a checkpoint of this format, or bad metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pylint: disable=broad-except  # truncated, not torch, ...
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(err).__name__}: {first_line}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    try:
        meta = ModelMeta.from_dict(blob["meta"], path)
        extra = {str(k): v.numpy() for k, v in blob.get("extra", {}).items()}
        state = {str(k): v for k, v in blob.get("model", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path} is malformed ({type(err).__name__}: {err})") from None
    for name, value in extra.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise CheckpointError(f"checkpoint {path}: array '{name}' holds "
                                  f"{int((~np.isfinite(value)).sum())} NaN/inf values")
    return SavedModel(meta, state, extra)


def check_tensors(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse a saved ``state`` that does not fit ``model``: a tensor missing or extra, of
    another shape or dtype, or holding NaN/inf.

    Raises:
        CheckpointError: naming ``path`` and the first tensor at fault.
    """
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    extra = [name for name in state if name not in expected]
    if missing or extra:
        name, what = (missing[0], "is missing") if missing else (extra[0], "is not a tensor of the model")
        raise CheckpointError(f"checkpoint {path}: tensor '{name}' {what} "
                              f"({len(missing)} missing, {len(extra)} unexpected)")
    for name, want in expected.items():
        have = state[name]
        if not isinstance(have, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: tensor '{name}' is a {type(have).__name__}")
        if tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
            raise CheckpointError(f"checkpoint {path}: tensor '{name}' is {have.dtype}{list(have.shape)}, "
                                  f"the model's is {want.dtype}{list(want.shape)}")
        if have.is_floating_point() and not bool(torch.isfinite(have).all()):
            raise CheckpointError(f"checkpoint {path}: tensor '{name}' holds "
                                  f"{int((~torch.isfinite(have)).sum())} NaN/inf values")


def check_meta(meta: ModelMeta, expected: Mapping[str, Any], path: Path) -> None:
    """Refuse ``meta`` where a field differs from ``expected`` (field name -> value).

    Raises:
        CheckpointError: naming the first field that differs, with both values.
    """
    for name, want in expected.items():
        have = getattr(meta, name)
        if name == "input_shape":
            have, want = tuple(have), tuple(want)
        if have != want:
            raise CheckpointError(
                f"checkpoint {path} does not match: '{name}' is {have!r} in the checkpoint, "
                f"{want!r} here"
            )


def load_personalized(
    path: Path, expected: Mapping[str, Any] | None = None, device: str = "cpu"
) -> nn.Module:
    """The model saved in checkpoint ``path`` (a file, or a node's folder holding one),
    built from its metadata, in eval mode on ``device``.

    Args:
        path: a ``.pt`` checkpoint, or a folder with exactly one (current) checkpoint.
        expected: metadata fields the checkpoint must have, e.g.
            ``{"architecture": "mlp", "fingerprint": "..."}``.

    Raises:
        CheckpointError: no checkpoint, an ambiguous folder, or a field that differs.
    """
    file = resolve_checkpoint(path)
    saved = read_checkpoint(file)
    check_meta(saved.meta, expected or {}, Path(path))
    return model_from(saved, device, file)


def model_from(saved: SavedModel, device: str = "cpu", path: Path | None = None) -> nn.Module:
    """The model of a checkpoint already read, built from its metadata, in eval mode.

    Raises:
        CheckpointError: the checkpoint holds no model (e.g. fedavg-topk's node state), an
            architecture this version does not build, or tensors that do not fit it.
    """
    where = path or f"of strategy {saved.meta.strategy!r}"
    if not saved.state:
        raise CheckpointError(f"the checkpoint {where} holds no model (strategy {saved.meta.strategy!r})")
    try:
        model = build_model(saved.meta.architecture, saved.meta.spec, seed=0, private=saved.meta.private)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {where}: field 'architecture' = "
                              f"{saved.meta.architecture!r} with input {saved.meta.input_shape} "
                              f"cannot be built ({type(err).__name__}: {err})") from None
    check_tensors(model, saved.state, Path(str(where)))
    model.load_state_dict(saved.state)
    return model.to(device).eval()


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a file, else the one current checkpoint in that folder.

    Raises:
        CheckpointError: a folder with none, or with several (name the file then).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.glob(f"*{SUFFIX}") if not p.name.endswith(PREVIOUS_SUFFIX))
        if len(found) != 1:
            names = [p.name for p in found]
            raise CheckpointError(
                f"{path} holds {len(found)} checkpoints {names}; pass the file of the one you want"
            )
        return found[0]
    return path
