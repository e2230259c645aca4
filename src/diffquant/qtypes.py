"""Quantized number formats, described like ``torch.dtype``s: small frozen dataclasses.

Integer formats are ``int{bits}`` (signed, symmetric around 0 or with a zero point); ``fp8_e4m3``
is ``torch.float8_e4m3fn`` (max 448) with a float scale; ``ternary`` is ``{-1, 0, +1}`` and
``binary`` ``{-1, +1}``, both times a per-channel scale (weights only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QType:
    """A quantized number format.

    Attributes:
        name: short name used in recipes (``"int8"``, ``"fp8_e4m3"``...).
        kind: ``"int"``, ``"float"``, ``"ternary"`` or ``"binary"``.
        bits: storage bits per value (2 for ternary, 1 for binary).
        qmin, qmax: integer range of a signed, symmetric grid (``-(2^(b-1)-1) .. 2^(b-1)-1``,
            the symmetric "restricted" range, so that ``-x`` is representable whenever ``x`` is).
        max_value: largest finite value of a float format (448 for E4M3).
    """

    name: str
    kind: str
    bits: int
    qmin: int = 0
    qmax: int = 0
    max_value: float = 0.0

    @property
    def levels(self) -> int:
        """Number of representable integer levels for an asymmetric (zero-point) grid."""
        return 2**self.bits

    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype that stores one value, where there is one."""
        if self.kind == "float":
            return torch.float8_e4m3fn
        if self.kind == "int" and self.bits <= 8:
            return torch.int8
        return None

    def __str__(self) -> str:
        return self.name


def qint(bits: int) -> QType:
    """The signed integer format with ``bits`` bits (2..8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"integer bits must be in 2..8, got {bits}")
    q = 2 ** (bits - 1) - 1
    return QType(f"int{bits}", "int", bits, -q, q)


int8, int6, int4 = qint(8), qint(6), qint(4)
fp8_e4m3 = QType("fp8_e4m3", "float", 8, max_value=float(torch.finfo(torch.float8_e4m3fn).max))
ternary = QType("ternary", "ternary", 2, -1, 1)
binary = QType("binary", "binary", 1, -1, 1)

_NAMED = {q.name: q for q in (fp8_e4m3, ternary, binary)}


def get_qtype(name: str | QType) -> QType:
    """Look a format up by name: ``int2``..``int8``, ``fp8_e4m3`` (alias ``fp8``), ``ternary``, ``binary``."""
    if isinstance(name, QType):
        return name
    if name == "fp8":
        return fp8_e4m3
    if name in _NAMED:
        return _NAMED[name]
    if name.startswith("int") and name[3:].isdigit() and 2 <= int(name[3:]) <= 8:
        return qint(int(name[3:]))
    raise ValueError(f"Unknown quantized format {name!r}; use int2..int8, fp8_e4m3, ternary or binary.")
