"""Codecs for the knowledge that crosses the wire: client logits up, soft targets down.

Each codec turns an ``[N, C]`` float32 array into a few named numpy arrays (the payload,
counted byte for byte by :mod:`kta_flwr.flower.metering`) and back. Pure numpy, no Flower.

``kind`` says what the rows are: ``"logits"`` (any real rows; only their softmax matters,
so a codec may shift a row by a constant) or ``"probs"`` (rows on the simplex).

=========  ==========================================  ================================
codec      payload per row (C classes)                 bound on the decoded rows
=========  ==========================================  ================================
float32    C x float32                                 exact
float16    C x float16                                 ``|x - x'| <= 2^-11 |x|`` (+ 2^-24)
bfloat16   C x bfloat16 (as uint16)                    ``|x - x'| <= 2^-8 |x|``
int8       C x int8 + 1 float32 scale                  logits: centred rows within
                                                       ``scale / 2``; probs: within
                                                       ``scale / 2``, ``scale = max|x| / 127``
topk       k x class index (uint8/uint16) +            total variation between the
           k x probability as uint8 (1/255 steps)      softmax rows ``<= r + k / 510``,
                                                       ``r`` the mass outside the top k
=========  ==========================================  ================================

``topk`` sends the k largest probabilities of each row's softmax (of the logits, or of
the probability row itself) and implies the remainder mass, spread evenly over the other
classes; logits decode to ``log p'`` (whose softmax is ``p'``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CODECS = ("float32", "float16", "bfloat16", "int8", "topk")
KINDS = ("logits", "probs")


class CodecError(ValueError):
    """A payload does not match its codec (names, shapes, dtypes, values)."""


@dataclass(frozen=True)
class Codec:
    """A codec name and, for ``topk``, the entries kept per row."""

    name: str = "float32"
    k: int = 3

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose one of {list(CODECS)}")
        if self.name == "topk" and self.k < 1:
            raise ValueError(f"topk codec needs k >= 1, got {self.k}")

    def names(self) -> tuple[str, ...]:
        """Names of the payload arrays."""
        return {"int8": ("q", "scale"), "topk": ("index", "prob")}.get(self.name, ("values",))

    def row_bytes(self, num_classes: int) -> int:
        """Payload bytes per row for ``num_classes`` classes."""
        if self.name == "topk":
            k = min(self.k, num_classes)
            return k * (_index_dtype(num_classes).itemsize + 1)
        return {"float32": 4 * num_classes, "float16": 2 * num_classes,
                "bfloat16": 2 * num_classes, "int8": num_classes + 4}[self.name]


def _index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def _from_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode(values: np.ndarray, codec: Codec, kind: str = "logits") -> dict[str, np.ndarray]:
    """Encode ``[N, C]`` rows; returns the named payload arrays."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    if x.ndim != 2:
        raise CodecError(f"expected an [N, C] array, got shape {x.shape}")
    if codec.name == "float32":
        return {"values": x}
    if codec.name == "float16":
        return {"values": x.astype(np.float16)}
    if codec.name == "bfloat16":
        return {"values": _to_bfloat16(x)}
    if codec.name == "int8":
        if kind == "logits":  # softmax is shift-invariant: centre each row
            x = x - x.mean(axis=1, keepdims=True)
        scale = np.abs(x).max(axis=1) / 127.0
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        return {"q": q, "scale": scale.astype(np.float32)}
    # topk
    probs = _softmax(x) if kind == "logits" else np.clip(x, 0.0, None)
    k = min(codec.k, x.shape[1])
    index = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, index, axis=1)
    prob = np.clip(np.rint(top * 255.0), 0, 255).astype(np.uint8)
    return {"index": index.astype(_index_dtype(x.shape[1])), "prob": prob}


def decode(
    payload: dict[str, np.ndarray], num_samples: int, num_classes: int, codec: Codec,
    kind: str = "logits",
) -> np.ndarray:
    """Decode a payload to float32 ``[num_samples, num_classes]`` rows.

    Raises:
        CodecError: naming the array whose name, shape, dtype or values are wrong.
    """
    expected = codec.names()
    if sorted(payload) != sorted(expected):
        raise CodecError(f"codec {codec.name!r} expects arrays {list(expected)}, got {sorted(payload)}")
    n, c = num_samples, num_classes

    def check(name: str, shape: tuple[int, ...], dtypes: tuple[np.dtype, ...]) -> np.ndarray:
        arr = np.asarray(payload[name])
        if arr.shape != shape:
            raise CodecError(f"'{name}' has shape {arr.shape}, expected {shape}")
        if arr.dtype not in dtypes:
            raise CodecError(f"'{name}' has dtype {arr.dtype}, expected {[str(d) for d in dtypes]}")
        return arr

    if codec.name in ("float32", "float16"):
        out = check("values", (n, c), (np.dtype(codec.name),)).astype(np.float32)
    elif codec.name == "bfloat16":
        out = _from_bfloat16(check("values", (n, c), (np.dtype(np.uint16),)))
    elif codec.name == "int8":
        q = check("q", (n, c), (np.dtype(np.int8),))
        scale = check("scale", (n,), (np.dtype(np.float32),))
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise CodecError("'scale' must be finite and >= 0")
        out = q.astype(np.float32) * scale[:, None]
    else:
        k = min(codec.k, c)
        index = check("index", (n, k), (_index_dtype(c),)).astype(np.int64)
        prob = check("prob", (n, k), (np.dtype(np.uint8),)).astype(np.float32) / 255.0
        if (index >= c).any():
            raise CodecError(f"'index' has class indices >= {c}")
        if any(len(set(row)) < k for row in index.tolist()):
            raise CodecError("'index' repeats a class within a row")
        top = np.minimum(prob, 1.0)
        rest = np.clip(1.0 - top.sum(axis=1, keepdims=True), 0.0, None)
        out = np.full((n, c), 0.0, dtype=np.float32)
        if c > k:
            out += rest / (c - k)
        np.put_along_axis(out, index, top, axis=1)
        out /= np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
        if kind == "logits":
            out = np.log(np.maximum(out, 1e-8)).astype(np.float32)
    if not np.isfinite(out).all():
        raise CodecError(f"decoded rows have {int((~np.isfinite(out)).sum())} NaN/inf values")
    return out.astype(np.float32, copy=False)
