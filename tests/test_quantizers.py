"""The quantizer registry: each scheme's stored bytes by hand."""

from __future__ import annotations

import math

from estimator.dtypes import block
from estimator.quantizers import QUANTIZERS

MIB = 1024**2


def test_nf4_double_quant_bytes_by_hand():
    n = 4096 * 4096  # 16 Mi weights: 8 MiB of codes, 262,144 blocks of 64
    blocks = n // 64
    expected = 8 * MIB + 512 + blocks + 512 + block(4 * math.ceil(blocks / 256))
    assert QUANTIZERS["nf4"].stored_bytes(n, 4096, double_quant=True) == expected


def test_nf4_without_double_quant_keeps_fp32_absmax():
    n = 4096 * 4096
    assert QUANTIZERS["nf4"].stored_bytes(n, 4096, double_quant=False) == 8 * MIB + 512 + 4 * (n // 64)


def test_int8_has_one_scale_per_row():
    assert QUANTIZERS["int8"].stored_bytes(4096 * 14336, 14336, False) == 4096 * 14336 + 14336 * 4
