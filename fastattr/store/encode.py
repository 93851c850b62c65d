"""Parallel chunk encoding: HDF5's shuffle + deflate + fletcher32 pipeline (compression "gzip") or
its fletcher32 alone (compression "none") done in Python threads, so the writer thread only hands
finished chunks to HDF5 (``write_direct_chunk``).

h5py serialises every call behind one lock and HDF5 compresses inside that call, so a single
writer thread tops out at one core's deflate rate. Here the byte shuffle (numpy) and deflate
(zlib, which releases the GIL) run in a thread pool; the checksum is HDF5's own fletcher32
(``H5_checksum_fletcher32``, reproduced exactly below), appended little-endian as HDF5's filter
does. The dataset declares exactly that pipeline (shuffle, gzip, fletcher32: store/shard.py), so
plain h5py / HDF5 reads the chunks with no plugin and checks their checksums on every read.

ChunkBuffer keeps a dataset's rows that do not yet fill a whole chunk in memory until the next
block completes the chunk, or the shard finishes (then the partial chunk is padded with zeros,
HDF5's fill value, as HDF5 pads an edge chunk).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

_BLOCK = 360  # words per fletcher32 inner loop in HDF5 (sums reduced after each such block)
_WEIGHTS = np.arange(_BLOCK, 0, -1, dtype=np.float64)  # sum2 gains sum1 after every word: t, t-1, ..., 1
_M32 = 0xFFFFFFFF
_FOLD_ROUNDS = 64  # vectorised fold passes before finishing sequentially (real data needs 2-4)


def _fold(x: Any) -> Any:
    """HDF5's reduction of a fletcher32 sum: the low 16 bits plus the carry (an int or an array)."""
    return (x & 0xFFFF) + (x >> 16)


def _folded_sums(add: np.ndarray) -> np.ndarray:
    """s[k] = fold(s[k-1] + add[k]) (uint32 arithmetic, s[-1] = 0) for every k, vectorised.

    A fold keeps a value mod 65535 but picks its representative from the exact value, so the
    recurrence is sequential. It is solved by iterating s <- fold(shift(s) + add) from the right
    values mod 65535: a fixed point satisfies the recurrence, which has one solution, and a wrong
    representative rarely changes the next fold (x and x + 65535 mostly fold alike), so a few
    passes settle it. Without the Python loop per 360 words the encode threads hold the GIL for a
    few numpy calls per chunk instead of one loop step per 720 bytes."""
    s = np.cumsum(add) % 0xFFFF
    for _ in range(_FOLD_ROUNDS):
        prev = np.concatenate(([0], s[:-1]))
        new = _fold((prev + add) & _M32)
        if np.array_equal(new, s):
            return s
        s = new
    out, v = np.empty_like(add), 0
    for k, a in enumerate(add.tolist()):  # sequentially, in Python ints
        v = _fold((v + a) & _M32)
        out[k] = v
    return out


def fletcher32(data: bytes | bytearray | memoryview) -> int:
    """HDF5's H5_checksum_fletcher32 of ``data``, bit for bit: big-endian 16-bit words summed in
    unsigned 32-bit arithmetic (wrapping), both sums folded after every 360 words, an odd last
    byte as the high byte of a word, and a final fold. Per 360-word block the word sum and the
    weighted sum (each word counts once per later step) are exact in float64 (below 2**53); the
    folds between blocks run vectorised (``_folded_sums``)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    n_words = raw.size // 2
    s1 = s2 = 0
    if n_words:
        words = raw[: 2 * n_words].view(">u2")
        full, rest = divmod(n_words, _BLOCK)
        w = words[: full * _BLOCK].reshape(full, _BLOCK).astype(np.float64)
        sums = w.sum(1).astype(np.int64)
        weighted = np.einsum("ij,j->i", w, _WEIGHTS).astype(np.int64)  # einsum: no BLAS threads inside the encode pool
        steps = np.full(full, _BLOCK, dtype=np.int64)
        if rest:
            tail = words[full * _BLOCK :].astype(np.int64)
            sums = np.append(sums, tail.sum())
            weighted = np.append(weighted, (tail * np.arange(rest, 0, -1, dtype=np.int64)).sum())
            steps = np.append(steps, rest)
        s1_after = _folded_sums(sums)
        s1_before = np.concatenate(([0], s1_after[:-1]))
        s2_after = _folded_sums(steps * s1_before + weighted)
        s1, s2 = int(s1_after[-1]), int(s2_after[-1])
    if raw.size % 2:
        s1 = (s1 + (int(raw[-1]) << 8)) & _M32
        s2 = (s2 + s1) & _M32
        s1, s2 = _fold(s1), _fold(s2)
    s1, s2 = _fold(s1), _fold(s2)
    return ((s2 << 16) | s1) & _M32


def shuffle(a: np.ndarray) -> bytes:
    """HDF5's shuffle filter on one whole chunk: byte 0 of every element, then byte 1, ..."""
    size = a.dtype.itemsize
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    if size == 1:
        return flat.tobytes()
    return flat.reshape(-1, size).T.tobytes()


_PROBE = 8192  # bytes of each byte plane compressed first to decide whether the plane is worth it
_WORTH = 0.9  # deflate a plane whose probe shrinks below this fraction; store the others as they are
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, "fastest" (a hint readers ignore); 0x7801 % 31 == 0


def deflate_planes(shuffled: bytes, planes: int, level: int) -> bytes:
    """A zlib stream of ``shuffled`` (``planes`` byte planes of equal size) that deflates only the
    planes that compress: a float's low mantissa bytes are noise, and deflating them costs as much
    as the rest for nothing. Each plane is its own run of deflate blocks (level 0 = stored), ended by
    a full flush (byte-aligned, no back-references across planes), so the runs concatenate into one
    valid stream; any inflate (HDF5's deflate filter) reads it."""
    n = len(shuffled) // planes
    view = memoryview(shuffled)
    out = [_ZLIB_HEADER]
    for p in range(planes):
        plane = view[p * n : (p + 1) * n] if p < planes - 1 else view[p * n :]
        probe = plane[:_PROBE]
        worth = len(zlib.compress(probe, 1)) < _WORTH * len(probe)
        c = zlib.compressobj(level if worth else 0, zlib.DEFLATED, -15)
        out.append(c.compress(plane))
        out.append(c.flush(zlib.Z_FINISH if p == planes - 1 else zlib.Z_FULL_FLUSH))
    out.append(struct.pack(">I", zlib.adler32(shuffled)))
    return b"".join(out)


_PIECES = 16  # contiguous pieces per sampled row, spread over it (padding at a row's end counts too)


def deflate_ratio(rows: np.ndarray, level: int, budget: int) -> float:
    """raw / stored size of ``rows`` through this encoder, estimated on about ``budget`` bytes: whole
    rows spread over the block where they are small; else four rows spread over the block, from each
    _PIECES contiguous, non-overlapping pieces spread over the row (a prefix alone would miss, e.g.,
    the padded end of token rows). Deterministic: the same rows always give the same estimate (so a
    rerun makes the same choice)."""
    n = rows.shape[0]
    flat = rows.reshape(n, -1)
    if n == 0 or flat.shape[1] == 0:
        return 1.0
    width, item = flat.shape[1], flat.itemsize
    if width * item * min(n, 4) <= budget:  # small rows: as many whole rows as the budget holds
        picks = np.unique(np.linspace(0, n - 1, num=min(n, max(1, budget // (width * item)))).round().astype(np.int64))
        sample = np.ascontiguousarray(flat[picks])
    else:
        picks = np.unique(np.linspace(0, n - 1, num=min(n, 4)).round().astype(np.int64))
        piece = max(1, budget // len(picks) // _PIECES // item)  # piece * _PIECES < width: no overlap
        starts = np.linspace(0, width - piece, num=_PIECES).round().astype(np.int64)
        sample = np.ascontiguousarray(np.stack([flat[r, s : s + piece] for r in picks for s in starts]))
    return sample.nbytes / len(deflate_planes(shuffle(sample), sample.dtype.itemsize, level))


def encode_chunk(a: np.ndarray, level: int | None) -> bytes | bytearray:
    """One whole chunk as HDF5 stores it through shuffle + deflate(level) + fletcher32, or with
    level None (compression "none") through fletcher32 alone: the raw bytes and their checksum."""
    if level is None:
        raw = memoryview(np.ascontiguousarray(a)).cast("B")
        out = bytearray(raw.nbytes + 4)  # one copy: the bytes, then the checksum in place
        out[: raw.nbytes] = raw
        struct.pack_into("<I", out, raw.nbytes, fletcher32(raw))
        return out
    packed = deflate_planes(shuffle(a), a.dtype.itemsize, level)
    return packed + struct.pack("<I", fletcher32(packed))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def workers() -> int:
    """Encoding threads: one per usable core (FASTATTR_ENCODE_THREADS overrides), at least 1."""
    env = os.environ.get("FASTATTR_ENCODE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pool() -> ThreadPoolExecutor:
    """The process's encoding pool (shared by every writer; its threads only compress)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="fastattr-encode")
        return _pool


class ChunkBuffer:
    """One dataset's rows on their way to whole chunks of ``chunk_rows`` rows. ``add`` returns
    (first row, future of the encoded chunk) for every chunk the new rows complete, in order; the
    rows of an incomplete chunk wait in ``tail`` (``flush`` encodes them, zero-padded)."""

    def __init__(self, chunk_rows: int, level: int | None) -> None:
        self.chunk_rows = chunk_rows
        self.level = level
        self.written = 0  # rows handed to the pool (always whole chunks, or the final flush)
        self.tail: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> list[tuple[int, Future[bytes]]]:
        out: list[tuple[int, Future[bytes]]] = []
        if self.tail is not None:  # complete the waiting chunk first (copies only that chunk's rows)
            need = self.chunk_rows - len(self.tail)
            if len(rows) < need:
                self.tail = np.concatenate([self.tail, rows])
                return out
            out.append((self.written, pool().submit(encode_chunk, np.concatenate([self.tail, rows[:need]]), self.level)))
            self.written += self.chunk_rows
            rows, self.tail = rows[need:], None
        whole = len(rows) // self.chunk_rows * self.chunk_rows
        for lo in range(0, whole, self.chunk_rows):
            out.append((self.written + lo, pool().submit(encode_chunk, rows[lo : lo + self.chunk_rows], self.level)))
        self.written += whole
        # a copy, so the caller's block is not kept alive (or changed) through a view
        self.tail = rows[whole:].copy() if whole < len(rows) else None
        return out

    def flush(self) -> list[tuple[int, Future[bytes]]]:
        if self.tail is None:
            return []
        padded = np.zeros((self.chunk_rows, *self.tail.shape[1:]), dtype=self.tail.dtype)
        padded[: len(self.tail)] = self.tail
        out = [(self.written, pool().submit(encode_chunk, padded, self.level))]
        self.written += len(self.tail)
        self.tail = None
        return out
