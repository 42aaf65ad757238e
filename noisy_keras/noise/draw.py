"""The noise draw: standard normals that are a pure function of (seed, step), in any program.

Counter-based Philox-4x32-10 with key = seed and counter = (block, step), so the
noise of update t is the same in eager, `tf.function` and XLA code, on any number
of replicas; `unit_noise` scales nothing (the schedule is `noise.schedules`).

References:
    J. K. Salmon, M. A. Moraes, R. O. Dror and D. E. Shaw, "Parallel Random
    Numbers: As Easy as 1, 2, 3", SC 2011.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from noisy_keras import _keras_internals as internals

_PHILOX = 1  # tf.random.Algorithm.PHILOX
_PACKET_MULTIPLE = 64  # positional draws are computed in multiples of this many numbers

__all__ = [
    "positional_standard_normal",
    "standard_normal",
    "unit_noise",
]


@tf.autograph.experimental.do_not_convert
def _philox_words_loop(num: int, seed: int, step, first_block=0) -> tf.Tensor:
    """`num` uint32 words of Philox-4x32-10 with key = seed, counter = (first_block + i, step).

    Bit for bit what `tf.raw_ops.StatelessRandomUniformFullIntV2(alg=PHILOX)`
    returns for key = [seed] and counter = [first_block, step]: block i of four
    words has the 128-bit counter (first_block + i, step), i.e. the 32-bit words
    (lo, hi of first_block + i, lo step, hi step), and the key (lo seed, hi
    seed; `seed` may use all 64 bits); ten rounds of Salmon et
    al.'s Philox-4x32 (multipliers 0xD2511F53 and 0xCD9E8D57, Weyl key bumps
    0x9E3779B9 and 0xBB67AE85). Written with TensorFlow ops for XLA: the ten
    rounds are a `tf.while_loop`, so each round's four words are stored once
    (one multiply-high per word pair, done in uint64). Unrolled, XLA's fusion
    recomputes the shared chain of rounds for every consumer of the four words
    (measured 4-20x slower on CPU), and XLA's own Philox is slower still.
    """
    blocks = (num + 3) // 4
    low32 = tf.constant(0xFFFFFFFF, tf.uint64)
    index = tf.cast(tf.range(blocks, dtype=tf.int64) + tf.cast(first_block, tf.int64), tf.uint64)
    step = tf.cast(tf.cast(step, tf.int64), tf.uint64)

    def u32(x):
        return tf.cast(x, tf.uint32)

    words = (
        u32(index & low32),
        u32(tf.bitwise.right_shift(index, tf.constant(32, tf.uint64))),
        tf.fill([blocks], u32(step & low32)),
        tf.fill([blocks], u32(tf.bitwise.right_shift(step, tf.constant(32, tf.uint64)))),
    )
    key = (
        tf.constant(int(seed) & 0xFFFFFFFF, tf.uint32),
        tf.constant((int(seed) >> 32) & 0xFFFFFFFF, tf.uint32),
    )

    def philox_round(w0, w1, w2, w3, k0, k1):
        p0 = tf.cast(w0, tf.uint64) * tf.constant(0xD2511F53, tf.uint64)
        p1 = tf.cast(w2, tf.uint64) * tf.constant(0xCD9E8D57, tf.uint64)
        hi0, lo0 = u32(tf.bitwise.right_shift(p0, tf.constant(32, tf.uint64))), u32(p0 & low32)
        hi1, lo1 = u32(tf.bitwise.right_shift(p1, tf.constant(32, tf.uint64))), u32(p1 & low32)
        return (
            hi1 ^ w1 ^ k0,
            lo1,
            hi0 ^ w3 ^ k1,
            lo0,
            k0 + tf.constant(0x9E3779B9, tf.uint32),
            k1 + tf.constant(0xBB67AE85, tf.uint32),
        )

    state = tf.while_loop(
        lambda *_: True, philox_round, words + key, maximum_iterations=10, parallel_iterations=1
    )
    return tf.reshape(tf.stack(state[:4], axis=1), [-1])[:num]


@tf.autograph.experimental.do_not_convert
def _philox_words(num: int, seed: int, step, first_block=0) -> tf.Tensor:
    """`num` uint32 Philox words keyed on (seed, step); the same numbers in and out of XLA.

    The words start at block `first_block` of the stream (four words a block),
    so `_philox_words(4 * n, s, t, first_block=o)` are words 4 o .. 4 (o + n) of
    `_philox_words(4 * (o + n), s, t)`.

    Outside XLA: TensorFlow's `StatelessRandomUniformFullIntV2` kernel. Inside
    an XLA computation: `_philox_words_loop`, which gives the same words about
    8x faster on CPU than XLA's lowering of that kernel.
    """
    if internals.in_xla_context():
        return _philox_words_loop(num, seed, step, first_block)
    key = tf.reshape(tf.cast(tf.constant(int(seed), tf.int64), tf.uint64), [1])
    counter = tf.stack(
        [
            tf.cast(tf.cast(first_block, tf.int64), tf.uint64),
            tf.cast(tf.cast(step, tf.int64), tf.uint64),
        ]
    )
    return tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[num], key=key, counter=counter, alg=_PHILOX, dtype=tf.uint32
    )


@tf.autograph.experimental.do_not_convert
def standard_normal(num: int, seed: int, step) -> tf.Tensor:
    """`num` i.i.d. N(0, 1) float32 numbers keyed on (seed, step), the same with and without XLA.

    Philox-4x32 (Salmon et al., 2011) is run with key = seed and a 128-bit
    counter whose high 64 bits are `step`, so the streams of different steps
    never overlap. TensorFlow's own `stateless_normal` gives different numbers
    under XLA than without it (the two kernels turn the same Philox bits into
    normals differently), so only the raw 32-bit Philox words are taken (from
    TensorFlow's kernel outside XLA, from an equivalent loop of TensorFlow ops
    inside it, which XLA compiles to faster code; both give the same words bit
    for bit) and turned into normals here by the Box-Muller transform (Box &
    Muller, 1958) on 24-bit uniforms in (0, 1). Compiled and uncompiled draws
    then differ by float32 rounding of log/sin/cos only (a few ulp), and each
    is exactly reproducible.

    Args:
        num: how many numbers, >= 0 (a Python int).
        seed: integer in [0, 2**31 - 1].
        step: t, a scalar integer (Python or tensor).

    Returns:
        A float32 tensor of shape [num].
    """
    half = (num + 1) // 2
    bits = _philox_words(2 * half, seed, step)
    radius, angle = _box_muller_polar(bits[:half], bits[half:])
    return tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)[:num]


def _box_muller_polar(radius_bits, angle_bits):
    """Radius sqrt(-2 log u1) and angle 2 pi u2 of the Box-Muller transform (Box & Muller, 1958).

    u1, u2 are uniforms in (0, 1) made of the top 24 bits of uint32 words,
    ((bits >> 8) + 0.5) * 2^-24, so that log never sees 0 and float32 holds them exactly.
    """

    def uniform(bits):
        return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) * (2.0**-24)

    return tf.sqrt(-2.0 * tf.math.log(uniform(radius_bits))), (2.0 * math.pi) * uniform(angle_bits)


@tf.autograph.experimental.do_not_convert
def positional_standard_normal(num, key: int, step, offset=0) -> tf.Tensor:
    """One N(0, 1) float32 number per position p in [offset, offset + num), keyed on (key, step).

    Position p takes the four Philox-4x32 words of the block with counter
    (p, step) under `key` and turns the first two into one normal by the
    Box-Muller transform (radius from word 0, cosine of the angle from word 1).
    Each number is thus a pure function of (key, step, p): the numbers of
    positions [o, o + n) are the same whether drawn as one block or in pieces
    (e.g. one piece per replica or per accumulation micro-batch), and the
    same with and without XLA up to float32 rounding of log and cos (the words
    are bit-identical, as in `standard_normal`; on CPU the two differ by less
    than 4 ulp of max(1, |z|), measured 2.7 over 3 million numbers).

    Args:
        num: how many positions, >= 0 (a Python int or a scalar integer tensor,
            e.g. a batch size known only at run time).
        key: the Philox key, an integer in [0, 2**63); callers salt their seed
            so that the key differs from every white-noise seed (< 2**31).
        step: t, a scalar integer (Python or tensor).
        offset: the first position, a scalar integer >= 0 (Python or tensor).

    Returns:
        A float32 tensor of shape [num].
    """
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < 2**63:
        raise ValueError(f"`key` must be an integer in [0, 2**63); received key={key!r}.")
    # CPU kernels compute log and cos in SIMD packets and the remainder one by one,
    # which rounds differently: a position's number would depend on where the
    # piece it is drawn in starts and ends. Rounding the count up to a multiple
    # of 64 (every packet width) keeps each number a function of (key, step, p).
    padded = (num + _PACKET_MULTIPLE - 1) // _PACKET_MULTIPLE * _PACKET_MULTIPLE
    words = tf.reshape(_philox_words(4 * padded, int(key), step, first_block=offset), [-1, 4])
    radius, angle = _box_muller_polar(words[:, 0], words[:, 1])
    return (radius * tf.cos(angle))[:num]


@tf.autograph.experimental.do_not_convert
def unit_noise(shapes: Sequence, seed: int, step, dtype=tf.float32, scale=None) -> list:
    """Standard normal noise for a list of shapes, keyed on (seed, step) only.

    One draw of `standard_normal` covers all shapes at once (cheaper than one op
    per variable) and is split and reshaped in order. The result depends on
    nothing but (seed, step, shapes), so every replica and every restart of a
    run draws the same numbers.

    Args:
        shapes: fully defined shapes, one per variable.
        seed: integer in [0, 2**31 - 1].
        step: t, a scalar integer (Python or tensor).
        dtype: dtype of the returned tensors.
        scale: None, or a float32 scalar (e.g. sigma_t) that multiplies the whole
            draw once before it is split, rather than once per variable.

    Returns:
        A list of tensors, one per shape, with i.i.d. N(0, 1) entries (times
        `scale` when given).
    """
    shapes = [tf.TensorShape(s) for s in shapes]
    for shape in shapes:
        if not shape.is_fully_defined():
            raise ValueError(f"`shapes` must be fully defined; received {shape}.")
    sizes = [int(s.num_elements()) for s in shapes]
    total = sum(sizes)
    if total == 0:
        return [tf.zeros(s, dtype) for s in shapes]
    flat = standard_normal(total, seed, step)
    if scale is not None:
        flat = flat * scale
    pieces = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
    return [tf.cast(tf.reshape(p, s), dtype) for p, s in zip(pieces, shapes)]
