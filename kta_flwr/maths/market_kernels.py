"""The market's heavy kernels in pure numpy, at a cost that grows like BLAS.

K clients, N reference rows, C classes. The market needs, per round, the ``[K, K]``
pairwise divergences of the clients' predictions and, for every client k, a mix of the
other clients' predictions (the targets, and the probability each candidate mix gives the
true labels). Written directly, each is a ``[K, K, N, C]`` computation with ``[K, N, C]``
temporaries per client. Here:

- **Divergences**: the symmetric KL, squared Hellinger and cosine are matrix products
  (``[K, N·C] x [N·C, K]``, by column chunks). Jensen-Shannon needs
  ``sum (p+q) log (p+q)`` for every pair, which no product gives: it runs over
  cache-sized tiles of the upper triangle, each shared by a group of students, on all
  cores (numpy releases the GIL), in float32 with float64 accumulation (the entropies
  stay float64); its error is ~1e-8 nats (``tests/test_market_scale.py``).
- **Mixtures with the prior correction** (``prob`` space): student k's mix of teacher j's
  prior-shifted softmax is ``q_k[i, c] = rho_k[c] sum_j W[k, j] E_j[i, c] / Z[j, i, k]``
  with ``E_j = exp((z_j - log pi_j) / T)``, ``rho_k = pi_k ** (1 / T)`` and
  ``Z[j, i, k] = sum_c E_j[i, c] rho_k[c]``: two batched matrix products per block of
  rows, never a ``[K, N, C]`` array per student.
- **Top-m teachers** (``neighbours``): when each row of W has few non-zeros, the mixes
  gather only those teachers (``K·m`` instead of ``K²`` work).

The mixes also take more teachers than students: weights ``[S, J]`` over J >= S teachers'
logits ``[J, N, C]`` (and priors ``[J, C]``), the S students being the first S teachers,
e.g. the K clients plus one background teacher (:mod:`kta_flwr.maths.market`).

Every kernel equals the direct transcription (:mod:`kta_flwr.maths.market_reference`) to
float rounding. Working memory per step is bounded by ``block_bytes``.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

EPS = 1e-12
#: The divergences :func:`pairwise_divergence` measures.
DIVERGENCES = ("js", "skl", "hellinger", "cosine")
#: Working memory of one blocked step (bytes).
BLOCK_BYTES = 64 * 2**20
#: Tile of the Jensen-Shannon kernel: at most this many columns, and teachers x columns
#: of about this many float32 values (1 MiB), shared by this many students while it is in
#: cache (each tile is read from memory once per group of students, not once per student).
_JS_COLUMNS, _JS_TILE, _JS_STUDENTS = 16384, 262144, 4


def check_divergence(kind: str) -> None:
    """Raise ``ValueError`` unless ``kind`` is one of :data:`DIVERGENCES`."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(DIVERGENCES)}")


def threads(workers: int | None = None) -> int:
    """Worker threads for the kernels: ``workers``, or every CPU of this process."""
    if workers:
        return max(1, workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def for_each(count: int, body: Callable[[int], None], workers: int | None = None) -> None:
    """Run ``body(i)`` for ``i`` in ``range(count)`` on :func:`threads` threads, in
    contiguous runs of ``i`` per task. Each call must write only its own slice of the
    output, so the result does not depend on the schedule (numpy releases the GIL in its
    loops and products)."""
    num_threads = threads(workers)
    if num_threads == 1 or count < 2 * num_threads:
        for i in range(count):
            body(i)
        return
    step = -(-count // (4 * num_threads))

    def run(start: int) -> None:
        for i in range(start, min(count, start + step)):
            body(i)

    # One BLAS thread per worker: BLAS's own threads on top would oversubscribe the cores.
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(num_threads) as pool:
        list(pool.map(run, range(0, count, step)))


def for_each_chunk(count: int, size: int, body: Callable[[slice], None],
                   workers: int | None = None) -> None:
    """:func:`for_each` over the consecutive slices of ``range(count)`` of ``size`` (the
    last one shorter): ``body(part)`` for each, on every core."""
    size = max(1, size)
    for_each(-(-count // size), lambda i: body(slice(i * size, min(count, (i + 1) * size))),
             workers)


class Scratch:
    """Work arrays that the tasks one thread runs in a kernel call reuse: a fresh large
    temporary per student costs its page faults every time, about as much as the work
    done on it. Create one per call (no state outlives it)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def array(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        """This thread's array ``name`` of ``shape`` and ``dtype`` (uninitialised)."""
        arrays = vars(self._local)
        have = arrays.get(name)
        if have is None or have.shape != shape or have.dtype != dtype:
            have = arrays[name] = np.empty(shape, dtype)
        return have

    def gather(self, source: np.ndarray, index: np.ndarray, part: slice = slice(None)) -> np.ndarray:
        """``source[index, part]`` of a C-contiguous ``source`` ``[J, N, C]`` (``index``
        ``[m]`` in range, ``part`` a slice of the N rows) as ``[m, b·C]``, in this
        thread's work array ``"gathered"`` instead of the temporary of fancy indexing."""
        if not source.flags.c_contiguous:  # a reshape would copy all of it for every student
            raise ValueError("gather needs a C-contiguous source")
        start, stop, _ = part.indices(source.shape[1])
        out = self.array("gathered", (len(index), (stop - start) * source.shape[2]), source.dtype)
        if (start, stop) == (0, source.shape[1]):
            return np.take(source.reshape(len(source), -1), index, axis=0, out=out, mode="clip")
        for row, j in zip(out, index):  # np.take is slow on strided blocks
            row[:] = source[j, start:stop].reshape(-1)
        return out


def _row_blocks(num_rows: int, bytes_per_row: int, block_bytes: int) -> Iterator[slice]:
    step = max(1, block_bytes // max(1, bytes_per_row))
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


# --- divergences -------------------------------------------------------------------------
def pairwise_divergence(
    probs: np.ndarray, kind: str = "js", *, workers: int | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> np.ndarray:
    """Mean per-row divergence between every pair of clients' predictions.

    Args:
        probs: ``[K, N, C]`` probability vectors (float32 or float64; clipped at 1e-12).
        kind: ``"js"`` (Jensen-Shannon, nats), ``"skl"`` (symmetric KL), ``"hellinger"``
            (squared Hellinger distance) or ``"cosine"`` (1 - cosine), as in
            :func:`kta_flwr.maths.market_reference.pairwise_divergence`.
        workers: threads for ``js`` (None: every CPU).

    Returns:
        ``[K, K]`` float64, symmetric, non-negative, zero diagonal.
    """
    check_divergence(kind)
    num_clients, num_rows = probs.shape[:2]
    flat = np.asarray(probs).reshape(num_clients, -1)
    if kind == "js":
        out = _js_sums(flat, workers, block_bytes) / num_rows
    else:
        out = _product_divergence(flat, kind, probs.shape[-1], block_bytes) / num_rows
    out = np.maximum(0.5 * (out + out.T), 0.0)
    np.fill_diagonal(out, 0.0)
    return out


def _column_chunks(flat: np.ndarray, block_bytes: int, row_length: int) -> Iterator[np.ndarray]:
    """float64 column chunks of ``flat`` [K, L], clipped at EPS, whole rows of ``row_length``."""
    width = max(row_length, (block_bytes // (8 * flat.shape[0])) // row_length * row_length)
    for start in range(0, flat.shape[1], width):
        chunk = flat[:, start:start + width].astype(np.float64)
        yield np.clip(chunk, EPS, 1.0, out=chunk)  # in place: a second copy costs as much


def _product_divergence(flat: np.ndarray, kind: str, num_classes: int, block_bytes: int) -> np.ndarray:
    num_clients = flat.shape[0]
    out = np.zeros((num_clients, num_clients))
    if kind == "skl":  # 0.5 sum (p - q)(log p - log q) = 0.5 (H_p + H_q - X_pq - X_qp)
        self_terms = np.zeros(num_clients)
        for chunk in _column_chunks(flat, block_bytes, num_classes):
            logs = np.log(chunk)
            out -= chunk @ logs.T
            self_terms += np.einsum("kl,kl->k", chunk, logs)
        return 0.5 * (out + out.T + self_terms[:, None] + self_terms[None, :])
    if kind == "hellinger":  # 1 - sum sqrt(p q) per row
        for chunk in _column_chunks(flat, block_bytes, num_classes):
            roots = np.sqrt(chunk)
            out += chunk.shape[1] // num_classes - roots @ roots.T
        return out
    for chunk in _column_chunks(flat, block_bytes, num_classes):  # 1 - cosine, per row
        rows = chunk.reshape(num_clients, -1, num_classes)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), EPS)
        rows = rows.reshape(num_clients, -1)
        out += rows.shape[1] // num_classes - rows @ rows.T
    return out


def _js_sums(flat: np.ndarray, workers: int | None, block_bytes: int) -> np.ndarray:
    """``sum_rows js(p_j, p_k)`` for every pair, via
    ``js = (H_j + H_k) / 2 - (1/2) sum s log s + (ln 2 / 2) sum s`` with ``s = p_j + p_k``
    and ``H = sum p log p`` (float64)."""
    num_clients, length = flat.shape
    p32 = flat.astype(np.float32, copy=False)
    if p32.min() < EPS or p32.max() > 1.0:  # (the market's own predictions are floored)
        p32 = np.clip(p32, EPS, 1.0)
    entropy, mass = np.zeros(num_clients), np.zeros(num_clients)
    for chunk in _column_chunks(p32, block_bytes, 1):
        entropy += np.einsum("kl,kl->k", chunk, np.log(chunk))
        mass += chunk.sum(axis=1)
    cols = min(length, _JS_COLUMNS)
    teachers = max(1, _JS_TILE // cols)

    def upper_rows(first: int) -> np.ndarray:
        """``sum s log s`` of students ``first, ..., first + g - 1`` against every client
        after ``first``, ``[g, K - first - 1]`` float64 (zero where the teacher is not after
        the student)."""
        students = range(first, min(num_clients, first + _JS_STUDENTS))
        others = p32[first + 1:]
        acc = np.zeros((len(students), len(others)))
        buf = np.empty((teachers, cols), np.float32)
        logs = np.empty((teachers, cols), np.float32)
        for a in range(0, len(others), teachers):
            for c in range(0, length, cols):
                tile = others[a:a + teachers, c:c + cols]
                for i, k in enumerate(students):
                    skip = max(0, k - first - a)  # the tile's teachers up to student k
                    if skip >= len(tile):
                        continue
                    shape = len(tile) - skip, tile.shape[1]
                    s, ls = buf[:shape[0], :shape[1]], logs[:shape[0], :shape[1]]
                    np.add(tile[skip:], p32[k, c:c + cols], out=s)
                    np.log(s, out=ls)
                    np.multiply(s, ls, out=s)
                    acc[i, a + skip:a + len(tile)] += s.sum(axis=1, dtype=np.float64)
        return acc

    sums = np.zeros((num_clients, num_clients))
    with ThreadPoolExecutor(threads(workers)) as pool:
        firsts = range(0, num_clients, _JS_STUDENTS)
        for first, rows in zip(firsts, pool.map(upper_rows, firsts)):
            for i, row in enumerate(rows):
                sums[first + i, first + i + 1:] = row[i:]
    sums += sums.T
    pair_entropy = entropy[:, None] + entropy[None, :]
    pair_mass = mass[:, None] + mass[None, :]
    return 0.5 * pair_entropy - 0.5 * sums + 0.5 * math.log(2.0) * pair_mass


# --- teacher mixtures --------------------------------------------------------------------
def _shifted(logits: np.ndarray, log_prior: np.ndarray | None, temperature: float,
             dtype: type = np.float64) -> np.ndarray:
    """``exp((z - log pi - max) / T)`` of a block ``[K, b, C]`` in row-major ``[b, K, C]``
    (max 1 per row)."""
    a = logits.transpose(1, 0, 2).astype(dtype)
    if log_prior is not None:
        a -= log_prior.astype(dtype)[None]
    a -= a.max(axis=-1, keepdims=True)
    a /= temperature
    return np.exp(a, out=a)


def _student_scales(priors: np.ndarray | None, num_clients: int, num_classes: int,
                    temperature: float) -> tuple[np.ndarray | None, np.ndarray]:
    """``(log pi or None, rho = pi ** (1/T) scaled to max 1)``, ``[K, C]`` each."""
    if priors is None:
        return None, np.ones((num_clients, num_classes))
    log_prior = np.log(np.asarray(priors, np.float64))
    scaled = (log_prior - log_prior.max(axis=1, keepdims=True)) / temperature
    return log_prior, np.exp(scaled)


def few_teachers(width: int, num_clients: int) -> bool:
    """Whether students with at most ``width`` teachers each (own column included) out of
    ``num_clients`` pay off gathered (``K·m`` work) rather than as dense ``[K, K]``
    matrices: at most a quarter of the columns."""
    return 4 * width <= num_clients


def first_true_columns(mask: np.ndarray, width: int) -> np.ndarray:
    """``[K, width]``: per row of ``mask`` ``[K, L]`` (bool), the columns of its True
    entries in ascending order, then its first False ones (``width`` columns in all, at
    most L): a stable argsort of ``~mask`` cut at ``width``, without the sort when every
    row holds exactly ``width`` True entries."""
    counts = mask.sum(axis=1)
    if np.all(counts == width):
        return np.nonzero(mask)[1].reshape(len(mask), width)
    return np.argsort(~mask, axis=1, kind="stable")[:, :width]


def _support(weights: np.ndarray) -> np.ndarray | None:
    """``[K, m]`` the teachers of each student (rows of ``weights`` ``[..., K, K]``, padded
    with teachers of weight 0) when no row has more than m non-zeros and m is small enough
    to pay off (:func:`few_teachers`); None for dense weights."""
    nonzero = (weights != 0).reshape(-1, *weights.shape[-2:]).any(axis=0)
    width = int(nonzero.sum(axis=1).max())
    if not few_teachers(width, weights.shape[-1]):
        return None
    return first_true_columns(nonzero, width)


def soft_targets(
    logits: np.ndarray,
    weights: np.ndarray,
    *,
    temperature: float = 1.0,
    space: str = "prob",
    priors: np.ndarray | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> np.ndarray:
    """Personalized soft targets ``[K, N, C]`` (float32, rows sum to 1); the same
    definition and arguments as :func:`kta_flwr.maths.market_reference.soft_targets`."""
    if space not in ("prob", "logit"):
        raise ValueError(f"unknown target space {space!r}; use prob or logit")
    num_teachers, num_rows, num_classes = logits.shape
    w = np.asarray(weights, np.float64)
    num_clients = _students(w, num_teachers)
    log_prior, rho = _student_scales(priors, num_teachers, num_classes, temperature)
    support = _support(w)
    if support is not None and space == "prob":
        return _sparse_mixture(logits, w, support, log_prior, rho, temperature)
    out = np.empty((num_clients, num_rows, num_classes), np.float32)
    w32, rho32 = w.astype(np.float32), rho[:num_clients].astype(np.float32)
    if support is not None:  # float32 mixes of float32 logits: targets within ~1e-6
        # One matrix-vector product per student over its m teachers' gathered rows, at
        # most block_bytes / threads of them at a time.
        step = max(1, block_bytes // (threads() * 4 * support.shape[1] * num_classes))
        source, scratch = np.ascontiguousarray(logits), Scratch()

        def student(k: int) -> None:
            teachers, mixed = support[k], out[k]  # [m], [N, C]
            for start in range(0, num_rows, step):
                rows = slice(start, start + step)
                np.matmul(w32[k, teachers], scratch.gather(source, teachers, rows),
                          out=mixed[rows].reshape(-1))
            if log_prior is not None:  # a float32 shift: a float64 one casts every entry
                mixed += (log_prior[k] - w[k, teachers] @ log_prior[teachers]).astype(np.float32)
            _softmax_rows(mixed, temperature)

        for_each(num_clients, student)
        return out
    # The prob-space mixes are float32 products (the targets are float32) of positive terms.
    bytes_per_row = 4 * num_teachers * max(num_teachers, num_classes) * 2
    for rows in _row_blocks(num_rows, bytes_per_row, block_bytes):
        block = logits[:, rows]
        if space == "logit":
            mixed = (w @ block.reshape(num_teachers, -1).astype(np.float64)).reshape(
                num_clients, -1, num_classes)
            if log_prior is not None:
                mixed += (log_prior[:num_clients] - w @ log_prior)[:, None, :]
            out[:, rows] = _softmax_rows(mixed, temperature)
        else:
            expd = _shifted(block, log_prior, temperature, np.float32)  # [b, J, C]
            mix = rho32 @ expd.transpose(0, 2, 1)  # Z: [b, K(k), J]
            np.divide(w32[None], mix, out=mix)
            targets = (mix @ expd).transpose(1, 0, 2) * rho32[:, None, :]  # [K(k), b, C]
            out[:, rows] = targets / targets.sum(axis=-1, keepdims=True)
    return out


def _students(weights: np.ndarray, num_teachers: int) -> int:
    """S, the students of ``weights`` ``[..., S, J]`` mixing J = ``num_teachers`` teachers
    (the first S teachers are the students)."""
    num_students, width = weights.shape[-2:]
    if width != num_teachers or num_students > num_teachers:
        raise ValueError(f"weights {weights.shape} do not mix {num_teachers} teachers "
                         "(want [..., S, J] with S <= J)")
    return num_students


def _softmax_rows(mixed: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(mixed / T)`` over the last axis, in ``mixed``'s memory."""
    mixed -= mixed.max(axis=-1, keepdims=True)
    if temperature != 1.0:
        mixed /= temperature
    np.exp(mixed, out=mixed)
    mixed /= row_sums(mixed)[..., None]
    return mixed


def _sparse_mixture(logits: np.ndarray, weights: np.ndarray, support: np.ndarray,
                    log_prior: np.ndarray | None, rho: np.ndarray, temperature: float) -> np.ndarray:
    """Prob-space targets ``[K, N, C]`` (float32) of students with few teachers each
    (``support``: ``[K, m]``), student by student."""
    expd = np.ascontiguousarray(
        _shifted(logits, log_prior, temperature, np.float32).transpose(1, 0, 2))  # [J, N, C]
    rho32 = rho.astype(np.float32)
    out = np.empty((len(support), *expd.shape[1:]), np.float32)
    scratch = Scratch()

    def student(k: int) -> None:
        teachers = support[k]
        mine = scratch.gather(expd, teachers).reshape(len(teachers), *expd.shape[1:])  # [m, N, C]
        share = weights[k, teachers, None].astype(np.float32) / (mine @ rho32[k])  # [m, N]
        mixed = np.einsum("jn,jnc->nc", share, mine) * rho32[k]
        out[k] = mixed / mixed.sum(axis=-1, keepdims=True)

    for_each(len(support), student)
    return out


def label_probability(
    logits: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    *,
    space: str = "prob",
    priors: np.ndarray | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> np.ndarray:
    """Probability each candidate mix gives the true label (at T = 1), for scoring.

    Args:
        logits: ``[J, M, C]`` on the M scoring rows; labels: ``[M]``.
        weights: ``[G, K, J]`` candidate teacher weights (one matrix per candidate; the
            K students are the first K of the J teachers, usually all of them).
        space, priors: as for :func:`soft_targets`.

    Returns:
        ``[G, K, M]``: ``q_g[k, i, y_i]`` of the targets at T = 1.
    """
    num_teachers, num_rows, num_classes = logits.shape
    w = np.asarray(weights, np.float64)
    num_clients = _students(w, num_teachers)
    labels = np.asarray(labels)
    log_prior, rho = _student_scales(priors, num_teachers, num_classes, 1.0)
    out = np.empty((len(w), num_clients, num_rows))
    support = _support(w)
    if space == "logit":
        # Student k's mix at T = 1 is softmax(sum_j W[k, j] (z_j - log pi_j) + log pi_k):
        # with r_j = z_j - log pi_j minus its row maximum (r_j <= 0, computed once), the
        # mix of the r_j differs from the mix of the z_j - log pi_j by a constant per row,
        # so exp never overflows and log pi_k enters as the factor rho_k of each class.
        relative = _relative_logits(logits, log_prior)  # [J, M, C] float32
        if support is not None:  # few teachers per student: gather them
            scratch, shape = Scratch(), (len(w), num_rows, num_classes)

            def logit_student(k: int) -> None:
                teachers = support[k]
                mixed = np.matmul(w[:, k, teachers].astype(np.float32),
                                  scratch.gather(relative, teachers),
                                  out=scratch.array("mixed", (len(w), num_rows * num_classes)))
                # float32 products: scores move ~1e-7 nats
                out[:, k] = _scaled_label_softmax(mixed.reshape(shape), labels, rho[k],
                                                  work=scratch.array("work", shape))

            for_each(num_clients, logit_student)
            return out
        flat = relative.reshape(num_teachers, -1)  # [J, M·C]
        for g in range(len(w)):  # a log-sum-exp per candidate: no shortcut to the label alone
            mixed = (w[g].astype(np.float32) @ flat).reshape(num_clients, num_rows, num_classes)
            out[g] = _scaled_label_softmax(mixed, labels, rho[:num_clients])
        return out
    if support is not None:  # few teachers per student: gather them
        expd = np.ascontiguousarray(_shifted(logits, log_prior, 1.0).transpose(1, 0, 2))  # [J, M, C]
        hit = np.take_along_axis(expd, labels[None, :, None], axis=-1)[..., 0]  # [J, M]
        scratch = Scratch()

        def prob_student(k: int) -> None:
            teachers = support[k]
            mine = scratch.gather(expd, teachers).reshape(len(teachers), num_rows, num_classes)
            ratio = hit[teachers] / (mine @ rho[k])
            out[:, k] = (w[:, k, teachers] @ ratio) * rho[k, labels]

        for_each(num_clients, prob_student)
        return out
    by_student = np.ascontiguousarray(w.transpose(1, 0, 2))  # [K(k), G, J]
    rho = rho[:num_clients]
    for rows in _row_blocks(num_rows, 8 * num_teachers * num_teachers, block_bytes):
        expd = _shifted(logits[:, rows], log_prior, 1.0)  # [b, J, C]
        ratio = rho @ expd.transpose(0, 2, 1)  # Z: [b, K(k), J]
        hit = np.take_along_axis(expd, labels[rows][:, None, None], axis=-1)  # [b, J, 1]
        np.divide(hit.transpose(0, 2, 1), ratio, out=ratio)
        mixed = np.matmul(by_student, ratio.transpose(1, 2, 0))  # [K(k), G, b]
        out[:, :, rows] = mixed.transpose(1, 0, 2) * rho[:, labels[rows]][None]
    return out


def label_softmax(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``softmax(logits)[..., i, y_i]``, ``[..., M]`` (float64) of logits ``[..., M, C]``,
    computed in their precision."""
    mixed = logits - logits.max(axis=-1, keepdims=True)
    index = labels.reshape((1,) * (mixed.ndim - 2) + (-1, 1))
    hit = np.take_along_axis(mixed, index, axis=-1)[..., 0]
    np.exp(mixed, out=mixed)
    return np.exp(hit.astype(np.float64)) / row_sums(mixed).astype(np.float64)


def _relative_logits(logits: np.ndarray, log_prior: np.ndarray | None) -> np.ndarray:
    """``[K, M, C]`` float32: ``z - log pi`` (``log_prior`` ``[K, C]``, or none) minus its
    maximum over classes, so every entry is <= 0 and each row's largest is 0."""
    out = np.array(logits, dtype=np.float32, order="C")
    shift = None if log_prior is None else log_prior.astype(np.float32)[:, None, :]

    def client(k: int) -> None:
        if shift is not None:
            out[k] -= shift[k]
        out[k] -= out[k].max(axis=-1, keepdims=True)

    for_each(len(out), client)
    return out


def _scaled_label_softmax(mixed: np.ndarray, labels: np.ndarray, rho: np.ndarray,
                          work: np.ndarray | None = None) -> np.ndarray:
    """``softmax(mixed + log rho)[..., i, y_i]``, ``[..., M]`` (float64), of mixes
    ``[..., M, C]`` of non-positive logits; ``rho`` (``[..., C]``: per leading index, the
    same for every row; in (0, 1]) scales each class. Rows whose every term underflows are
    redone with their own maximum. ``work``: an array of ``mixed``'s shape and dtype for
    the exponentials (None: a new one)."""
    index = labels.reshape((1,) * (mixed.ndim - 2) + (-1, 1))
    hit = np.exp(np.take_along_axis(mixed, index, axis=-1)[..., 0].astype(np.float64))
    scales = np.asarray(rho, mixed.dtype)
    total = np.matmul(np.exp(mixed, out=work), scales[..., :, None])[..., 0].astype(np.float64)
    low = total <= 1e-30
    picked = hit * np.take(scales, labels, axis=-1) / np.where(low, np.inf, total)
    if low.any():  # shifted by their own maximum first: float32 keeps their precision
        rows = mixed[low] - mixed[low].max(axis=-1, keepdims=True)
        rows += np.broadcast_to(np.log(scales)[..., None, :], mixed.shape)[low]
        picked[low] = label_softmax(rows, np.broadcast_to(labels, low.shape)[low])
    return picked


def row_sums(values: np.ndarray) -> np.ndarray:
    """``values.sum(axis=-1)``, ``[...]`` in ``values``' dtype, summed by BLAS (numpy's
    reduction over a short last axis is several times slower)."""
    flat = values.reshape(-1, values.shape[-1])
    return (flat @ np.ones(values.shape[-1], flat.dtype)).reshape(values.shape[:-1])


@dataclass(frozen=True)
class MarketKernels:
    """The three heavy computations of a market round, as one swappable set (the fast
    numpy kernels here; the direct transcription in :mod:`kta_flwr.maths.market_reference`)."""

    divergence: Callable[..., np.ndarray]
    targets: Callable[..., np.ndarray]
    label_probability: Callable[..., np.ndarray]


FAST = MarketKernels(pairwise_divergence, soft_targets, label_probability)
