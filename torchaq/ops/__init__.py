"""The ``torch.ops.torchaq.*`` operators: one schema table, then one module per op family.

:mod:`torchaq.ops.schemas` declares every schema once. Each family module registers, for its
ops, a fake kernel (shapes for ``torch.compile`` / meta tensors), a pure-torch
``<op>_reference`` as the ``CompositeExplicitAutograd`` kernel (the fallback on every device and
the oracle of the tests) and a Python entry point. The C++ extension (``torchaq/csrc``) overrides
the ``CPU`` key, the Triton kernels (``triton_kernels/``) the ``CUDA`` key. Nothing in this
package imports anything above it. ``README.md`` beside this file describes the backends and the
packed code layout.

=====================  ====================================================================
module                 ops
=====================  ====================================================================
``layout``             packed layout constants and the argument checks every backend shares
``lut``                ``compute_lut``
``pack``               ``pack_codes``, ``unpack_codes``
``scan``               ``lut_score``, ``lut_topk``
``quantized_scan``     ``lut_score_quantized`` (every class's score from the uint8 LUT of the 4-bit scans)
``row_topk``           ``row_topk`` (each row's best scores of a matrix in memory, ties by index)
``row_partition``      ``row_log_partition`` (each row's exact log-partition function, batch-invariant)
``mass_histogram``     ``mass_histogram`` (each row's exact softmax mass in bins of logit)
``inverse_cdf``        ``inverse_cdf`` (categorical draws from block-summed weights)
``proposal``           ``proposal_weights_`` (the full-vocabulary sampler's proposal as block weights, in place)
``reject``             ``reject_rounds`` (the full-vocabulary sampler's rejection rounds)
``tail_bounds``        ``tail_bounds_`` (the full-vocabulary sampler's bounds of the tail logits, in place)
``counter_rng``        counter-based uniforms (no op): a row's random numbers never depend on its batch
``encode``             ``pq_encode``, ``anisotropic_encode`` (PQ encoders)
``aq_encode``          ``aq_encode`` (additive codes, LSQ++)
``normal_apply``       ``anisotropic_normal_apply``, ``anisotropic_normal_rhs``
``rescore``            ``rescore_topk`` and the exact-logit helpers
``layer_topk``         ``layer_topk`` (scan + shortlist + re-score in one op)
``layer_sample``       ``layer_sample`` (the untruncated full-vocabulary sampler in one op)
``linear_ce``          ``linear_ce`` (fused linear cross-entropy: loss, log-sum-exp, gradients)
=====================  ====================================================================
"""
from torchaq.ops import schemas  # noqa: F401  (first: the families register against these schemas)
from torchaq.ops.aq_encode import aq_encode, aq_encode_reference
from torchaq.ops.encode import (
    anisotropic_encode,
    anisotropic_encode_reference,
    decode,
    l2_encode,
    pq_encode,
    pq_encode_reference,
    score_aware_encode,
)
from torchaq.ops.inverse_cdf import check_inverse_cdf_args, inverse_cdf, inverse_cdf_reference
from torchaq.ops.layer_sample import check_layer_sample_args, layer_sample_reference
from torchaq.ops.layer_topk import layer_topk, layer_topk_reference, quantize_rows_int8
from torchaq.ops.layout import (
    BITS_OF_K,
    BLOCK,
    bits_of_lut,
    check_compute_lut_args,
    check_finite,
    check_k,
    check_lut_scan_args,
    check_pack_args,
    check_unpack_args,
    num_blocks,
    packed_width,
)
from torchaq.ops.linear_ce import acc_dtype, check_linear_ce_args, linear_ce, linear_ce_reference
from torchaq.ops.lut import compute_lut, compute_lut_reference
from torchaq.ops.mass_histogram import check_mass_histogram_args, mass_histogram, mass_histogram_reference
from torchaq.ops.normal_apply import (
    anisotropic_normal_apply,
    anisotropic_normal_apply_reference,
    anisotropic_normal_rhs,
    anisotropic_normal_rhs_reference,
)
from torchaq.ops.pack import codes_of_packed_rows, pack_codes, pack_codes_reference, unpack_codes, unpack_codes_reference
from torchaq.ops.class_logits import class_logits
from torchaq.ops.rescore import (
    exact_logits,
    gather_rows,
    logits_of_rows,
    rescore_topk,
    rescore_topk_reference,
    row_logits,
)
from torchaq.ops.quantized_scan import lut_score_quantized, lut_score_quantized_reference, quantize_lut_reference, widen_scores
from torchaq.ops.proposal import (check_proposal_args, proposal_weights, proposal_weights_,
                                  proposal_weights_reference, proposal_width)
from torchaq.ops.reject import check_reject_args, reject_rounds, reject_rounds_reference
from torchaq.ops.row_partition import check_row_log_partition_args, row_log_partition, row_log_partition_reference
from torchaq.ops.row_topk import check_row_topk_args, row_topk, row_topk_reference
from torchaq.ops.scan import lut_score, lut_score_reference, lut_topk, lut_topk_reference
from torchaq.ops.tail_bounds import check_tail_bounds_args, tail_bounds_, tail_bounds_reference
from torchaq.ops.schemas import SCHEMAS

# every op of the schema table and its reference (the opcheck table of the tests is checked against it)
REFERENCES = {
    "compute_lut": compute_lut_reference,
    "pack_codes": pack_codes_reference,
    "unpack_codes": unpack_codes_reference,
    "lut_score": lut_score_reference,
    "lut_topk": lut_topk_reference,
    "lut_score_quantized": lut_score_quantized_reference,
    "row_topk": row_topk_reference,
    "row_log_partition": row_log_partition_reference,
    "inverse_cdf": inverse_cdf_reference,
    "mass_histogram": mass_histogram_reference,
    "reject_rounds": reject_rounds_reference,
    "proposal_weights_": proposal_weights_reference,
    "tail_bounds_": tail_bounds_reference,
    "aq_encode": aq_encode_reference,
    "rescore_topk": rescore_topk_reference,
    "pq_encode": pq_encode_reference,
    "anisotropic_encode": anisotropic_encode_reference,
    "anisotropic_normal_apply": anisotropic_normal_apply_reference,
    "anisotropic_normal_rhs": anisotropic_normal_rhs_reference,
    "layer_topk": layer_topk_reference,
    "layer_sample": layer_sample_reference,
    "linear_ce": linear_ce_reference,
}
assert REFERENCES.keys() == SCHEMAS.keys()
