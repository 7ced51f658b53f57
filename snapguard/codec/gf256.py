"""Arithmetic in GF(2^8) and the coding matrices of snapguard's Reed-Solomon code.

The field and the code are the ones `reedsolo` defines with its defaults: primitive polynomial
0x11d, generator (alpha) 2, first consecutive root (fcr) 0. A message of k symbols gets m parity
symbols, the remainder of ``M(x) * x^m`` divided by ``g(x) = prod_{i<m} (x - alpha^i)``, where
``M(x) = sum_i msg[i] * x^(k-1-i)`` (highest degree first, as reedsolo orders it).

The code is linear, so parity = P @ data over GF(2^8) for an m x k matrix P whose column i is
the parity of the unit message e_i. ``generator_matrix(k, m)`` stacks the identity on P: row r of
the (k+m) x k result makes codeword symbol r from the k data symbols. Because the code is MDS,
any k rows of it form an invertible matrix, which is what decoding inverts.

Everything here works on tiny matrices (at most 255 x 255), so clarity wins over speed.
"""

from __future__ import annotations

import functools

import numpy as np

from snapguard.errors import CodecError

PRIMITIVE_POLYNOMIAL = 0x11D
"""x^8 + x^4 + x^3 + x^2 + 1, reedsolo's default and the polynomial ISA-L's tables use."""

ALPHA = 2
"""The field element whose powers are the roots of the generator polynomial (reedsolo's ``generator``)."""

FIRST_ROOT = 0
"""reedsolo's ``fcr``: the roots are alpha^0 .. alpha^(m-1), so m == 1 is plain XOR."""

MAX_CODEWORD = 255
"""k + m can be at most 2^8 - 1 symbols for a Reed-Solomon code over GF(2^8)."""


@functools.cache
def exp_log_tables() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(exp, log)``: exp[i] = alpha^i for i < 510 (doubled to skip a modulo), log[alpha^i] = i.

    log[0] is 0 by convention; callers must treat zero separately.
    """
    exp = np.zeros(510, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x = _times_alpha(x)
    exp[255:] = exp[:255]
    return exp, log


def _times_alpha(x: int) -> int:
    """Multiply a field element by alpha (= 2): shift left and reduce by the primitive polynomial."""
    x <<= 1
    return x ^ PRIMITIVE_POLYNOMIAL if x & 0x100 else x


@functools.cache
def mul_table() -> np.ndarray:
    """Return the 256 x 256 uint8 table with ``table[a, b] == a * b`` in GF(2^8) (64 KiB, read-only)."""
    exp, log = exp_log_tables()
    table = exp[log[:, None] + log[None, :]]
    table[0, :] = 0
    table[:, 0] = 0
    table.flags.writeable = False
    return table


def mul(a: int, b: int) -> int:
    """Product of two field elements."""
    return int(mul_table()[a, b])


def inverse(a: int) -> int:
    """Multiplicative inverse of a non-zero field element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    exp, log = exp_log_tables()
    return int(exp[255 - log[a]])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product over GF(2^8) of uint8 matrices ``a`` (r x n) and ``b`` (n x c)."""
    products = mul_table()[a[:, :, None], b[None, :, :]]
    return np.bitwise_xor.reduce(products, axis=1).astype(np.uint8)


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a square uint8 matrix over GF(2^8), by Gauss-Jordan elimination.

    Raises CodecError if the matrix is singular (which never happens for k rows of
    ``generator_matrix``, since the code is MDS).
    """
    n = matrix.shape[0]
    table = mul_table()
    work = np.concatenate([matrix.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        nonzero = np.flatnonzero(work[col:, col])
        if nonzero.size == 0:
            raise CodecError(f"coding matrix is singular: column {col} has no pivot in\n{matrix}")
        pivot = col + int(nonzero[0])
        work[[col, pivot]] = work[[pivot, col]]
        work[col] = table[inverse(int(work[col, col])), work[col]]
        factors = work[:, col].copy()
        factors[col] = 0
        work ^= table[factors[:, None], work[col][None, :]]
    return work[:, n:].copy()


def generator_polynomial(m: int) -> list[int]:
    """Coefficients, highest degree first, of g(x) = prod_{i<m} (x - alpha^(FIRST_ROOT+i)), as in reedsolo."""
    exp, _ = exp_log_tables()
    poly = [1]
    for i in range(m):
        root = int(exp[FIRST_ROOT + i])
        # poly * (x + root): shift up one degree, then add root * poly.
        poly = [a ^ mul(root, b) for a, b in zip(poly + [0], [0] + poly)]
    return poly


def parity_matrix(k: int, m: int) -> np.ndarray:
    """The m x k matrix P with parity = P @ data; column i is the parity of the unit message e_i.

    The parity of a message is computed the way reedsolo's ``rs_encode_msg`` does it: synthetic
    division of the message followed by m zeros by the generator polynomial; the remainder is the
    parity, highest degree first.
    """
    gen = generator_polynomial(m)
    columns = []
    for i in range(k):
        work = [0] * (k + m)
        work[i] = 1
        for pos in range(k):
            coef = work[pos]
            if coef:
                for j in range(1, len(gen)):
                    work[pos + j] ^= mul(gen[j], coef)
        columns.append(work[k:])
    return np.array(columns, dtype=np.uint8).T.copy()


@functools.cache
def generator_matrix(k: int, m: int) -> np.ndarray:
    """The (k+m) x k systematic generator: identity on top of ``parity_matrix(k, m)`` (read-only)."""
    matrix = np.concatenate([np.eye(k, dtype=np.uint8), parity_matrix(k, m)], axis=0)
    matrix.flags.writeable = False
    return matrix


def decode_matrix(k: int, m: int, survivors: tuple[int, ...], targets: tuple[int, ...]) -> np.ndarray:
    """Rows that rebuild codeword symbols ``targets`` from the k codeword symbols ``survivors``.

    With S the survivors' rows of the generator, data = S^-1 @ survivors, so target t is
    ``G[t] @ S^-1 @ survivors``. Returns a len(targets) x k uint8 matrix.
    """
    gen = generator_matrix(k, m)
    recover_data = invert(gen[list(survivors)])
    return matmul(gen[list(targets)], recover_data)
