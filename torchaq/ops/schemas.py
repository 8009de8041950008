"""Every ``torch.ops.torchaq.*`` schema, declared once.

The op families (one module each in this package) register a fake kernel and a pure-torch
reference (``CompositeExplicitAutograd``: the fallback on every device and the oracle of the
tests) against these schemas; the C++ extension (``torchaq/csrc``) overrides the ``CPU`` key and
the Triton kernels (``triton_kernels/``) the ``CUDA`` key when they are available.
"""
import torch

LIB = torch.library.Library("torchaq", "DEF")

SCHEMAS = {
    "compute_lut": "compute_lut(Tensor queries, Tensor codebooks) -> Tensor",
    "pack_codes": "pack_codes(Tensor codes, int bits) -> Tensor",
    "unpack_codes": "unpack_codes(Tensor packed, int num_subspaces, int bits, int num_classes) -> Tensor",
    "lut_score": "lut_score(Tensor lut, Tensor packed, int num_classes, Tensor? bias=None) -> Tensor",
    "lut_score_quantized": "lut_score_quantized(Tensor lut, Tensor packed, int num_classes, Tensor? bias=None,"
                           " int columns=0) -> (Tensor, Tensor)",
    "row_topk": "row_topk(Tensor scores, int k) -> (Tensor, Tensor)",
    "row_log_partition": "row_log_partition(Tensor h, Tensor weight, Tensor? bias, float temperature, Tensor? floor)"
                         " -> Tensor",
    "mass_histogram": "mass_histogram(Tensor h, Tensor weight, Tensor? bias, float temperature, Tensor top,"
                      " float width, int bins) -> Tensor",
    "inverse_cdf": "inverse_cdf(Tensor weights, Tensor cum, Tensor rows, Tensor u) -> Tensor",
    "reject_rounds": "reject_rounds(Tensor h, Tensor weight, Tensor? bias, Tensor logits, Tensor classes, int num_tail,"
                     " Tensor top, Tensor floor, Tensor weights, Tensor cum, Tensor rows, Tensor keys, float temperature,"
                     " int proposals, int rounds, bool lut_tail) -> (Tensor, Tensor, Tensor, Tensor)",
    "proposal_weights_": "proposal_weights_(Tensor(a!) weights, int num_tail, Tensor logits, Tensor floor, Tensor top,"
                         " float temperature, int block) -> Tensor",
    "tail_bounds_": "tail_bounds_(Tensor(a!) scores, Tensor error_scales, Tensor h, float sigmas, Tensor step,"
                    " float rounding, Tensor head) -> Tensor",
    "lut_topk": "lut_topk(Tensor lut, Tensor packed, int num_classes, int k, Tensor? bias=None) -> (Tensor, Tensor)",
    "aq_encode": "aq_encode(Tensor x, Tensor codebooks, Tensor codes, Tensor eta, Tensor perturb, int icm_iters,"
                 " bool greedy) -> Tensor",
    "rescore_topk": "rescore_topk(Tensor h, Tensor weight, Tensor? bias, Tensor candidates, int k) -> (Tensor, Tensor)",
    "pq_encode": "pq_encode(Tensor x, Tensor codebooks) -> Tensor",
    "anisotropic_encode": "anisotropic_encode(Tensor x, Tensor codebooks, Tensor eta, int max_rounds) -> Tensor",
    "anisotropic_normal_apply": "anisotropic_normal_apply(Tensor x, Tensor codes, Tensor coef, Tensor codebooks) -> Tensor",
    "anisotropic_normal_rhs": "anisotropic_normal_rhs(Tensor x, Tensor codes, Tensor eta, Tensor coef, int num_codewords)"
                              " -> (Tensor, Tensor)",
    "layer_topk": "layer_topk(Tensor h, Tensor queries, Tensor codebooks, Tensor packed, int num_classes, int candidates,"
                  " Tensor? scan_bias, Tensor weight, Tensor? bias, Tensor side_rows, Tensor? weight_i8,"
                  " Tensor? row_scale, int shortlist, int k) -> (Tensor, Tensor)",
    "layer_sample": "layer_sample(Tensor h, Tensor queries, Tensor codebooks, Tensor packed, int num_classes,"
                    " Tensor? scan_bias, Tensor weight, Tensor? bias, Tensor side_rows, Tensor error_scales, Tensor seeds,"
                    " int head, float sigmas, float rounding, float temperature, float weight_range, int block,"
                    " int proposals, int rounds) -> (Tensor, Tensor, Tensor)",
    "linear_ce": "linear_ce(Tensor e, Tensor c, Tensor? bias, Tensor targets, Tensor? row_grad, int ignore_index,"
                 " float softcap, float label_smoothing, float z_loss, int class_block, int row_chunk)"
                 " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
for _schema in SCHEMAS.values():
    LIB.define(_schema)
