"""``torch.ops.torchaq.compute_lut``: ``LUT[b, m, j] = <q_m, C_m[j]>`` (fake kernel, reference, entry point)."""
from __future__ import annotations

import torch
from torch import Tensor

from torchaq.ops.layout import check_compute_lut_args
from torchaq.ops.schemas import LIB


@torch.library.register_fake("torchaq::compute_lut")
def _compute_lut_fake(queries: Tensor, codebooks: Tensor) -> Tensor:
    check_compute_lut_args(queries, codebooks)
    return queries.new_empty((queries.shape[0], codebooks.shape[0], codebooks.shape[1]), dtype=torch.float32)


@torch.library.impl(LIB, "compute_lut", "CompositeExplicitAutograd")
def compute_lut_reference(queries: Tensor, codebooks: Tensor) -> Tensor:
    check_compute_lut_args(queries, codebooks)
    m, _, dsub = codebooks.shape
    q = queries.float().reshape(queries.shape[0], m, dsub)
    return torch.einsum("bmd,mkd->bmk", q, codebooks.float()).contiguous()



def compute_lut(queries: Tensor, codebooks: Tensor) -> Tensor:
    """``LUT[b, m, j] = <q_m, C_m[j]>`` for queries ``(B, M*dsub)`` and codebooks ``(M, K, dsub)``; float32."""
    return torch.ops.torchaq.compute_lut(queries, codebooks)

