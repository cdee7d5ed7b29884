"""Round trips of every knowledge codec within its stated bound, and exact byte counts."""

import numpy as np
import pytest

from kta_flwr.maths.knowledge_codec import CODECS, Codec, CodecError, decode, encode
from kta_flwr.maths.payload import payload_bytes


def softmax(x):
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def rows(kind, n, c, seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, c)) * 4).astype(np.float32)
    return logits if kind == "logits" else softmax(logits).astype(np.float32)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("c", [10, 62, 300])
def test_round_trip_within_bound_and_bytes_exact(name, kind, c):
    codec = Codec(name, k=3)
    x = rows(kind, 200, c)
    payload = encode(x, codec, kind)
    assert payload_bytes(payload) == 200 * codec.row_bytes(c)
    y = decode(payload, 200, c, codec, kind)
    assert y.shape == x.shape and y.dtype == np.float32
    if name == "float32":
        assert np.array_equal(x, y)
    elif name == "float16":
        assert (np.abs(x - y) <= 2.0**-11 * np.abs(x) + 2.0**-24).all()
    elif name == "bfloat16":
        assert (np.abs(x - y) <= 2.0**-8 * np.abs(x)).all()
    elif name == "int8":
        ref = x - x.mean(axis=1, keepdims=True) if kind == "logits" else x
        scale = np.abs(ref).max(axis=1, keepdims=True) / 127
        assert (np.abs(ref - y) <= scale / 2 + 1e-6).all()
    else:
        p = softmax(x) if kind == "logits" else x
        q = softmax(y) if kind == "logits" else y
        rest = 1 - np.sort(p, axis=1)[:, -3:].sum(axis=1)
        tv = 0.5 * np.abs(p - q).sum(axis=1)
        assert (tv <= rest + 3 / 510 + 1e-5).all()
        assert np.allclose(q.sum(axis=1), 1, atol=1e-5)
        assert (np.argmax(q, axis=1) == np.argmax(p, axis=1)).mean() > 0.99


def test_compression_ratios_for_ten_classes():
    sizes = {name: Codec(name, k=2).row_bytes(10) for name in CODECS}
    assert sizes == {"float32": 40, "float16": 20, "bfloat16": 20, "int8": 14, "topk": 4}


def test_int8_keeps_the_softmax_of_logits():
    x = rows("logits", 50, 10) + 100.0  # a large shift is irrelevant under softmax
    y = decode(encode(x, Codec("int8"), "logits"), 50, 10, Codec("int8"), "logits")
    assert np.abs(softmax(x) - softmax(y)).max() < 0.02


@pytest.mark.parametrize("payload, match", [
    ({"values": np.zeros((5, 10), np.float32)}, "expects arrays"),
    ({"q": np.zeros((5, 9), np.int8), "scale": np.ones(5, np.float32)}, "shape"),
    ({"q": np.zeros((5, 10), np.int16), "scale": np.ones(5, np.float32)}, "dtype"),
    ({"q": np.zeros((5, 10), np.int8), "scale": np.full(5, np.nan, np.float32)}, "finite"),
])
def test_malformed_int8_payloads_are_rejected(payload, match):
    with pytest.raises(CodecError, match=match):
        decode(payload, 5, 10, Codec("int8"))


def test_malformed_topk_payloads_are_rejected():
    codec = Codec("topk", k=2)
    good = encode(rows("logits", 4, 10), codec)
    with pytest.raises(CodecError, match=">= 10"):
        decode({**good, "index": np.full((4, 2), 12, np.uint8)}, 4, 10, codec)
    with pytest.raises(CodecError, match="repeats"):
        decode({**good, "index": np.zeros((4, 2), np.uint8)}, 4, 10, codec)
    with pytest.raises(CodecError, match="NaN"):
        decode({"values": np.full((4, 10), np.inf, np.float16)}, 4, 10, Codec("float16"))


def test_unknown_codec_and_bad_k():
    with pytest.raises(ValueError, match="unknown codec"):
        Codec("zip")
    with pytest.raises(ValueError, match="k >= 1"):
        Codec("topk", k=0)


def test_softened_topk_rows_put_most_of_their_mass_on_the_classes_they_do_not_name():
    """Why top-k over many classes distils better at ``temperature`` = 1 (FEMNIST,
    docs/method.md#what-is-counted): the decoded remainder is flat, and at T = 3 over 62
    classes that floor outweighs the 3 classes sent."""
    probs = np.full((1, 62), 0.02 / 59)
    probs[0, :3] = (0.9, 0.05, 0.03)
    decoded = decode(encode(np.log(probs), Codec("topk", 3)), 1, 62, Codec("topk", 3))

    def floor_mass(temperature: float) -> float:
        soft = np.exp(decoded / temperature)
        return float(soft[0, 3:].sum() / soft.sum())

    assert floor_mass(1.0) == pytest.approx(0.02, abs=0.005)
    assert floor_mass(3.0) > 0.5
