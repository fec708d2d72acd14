"""Deliberate bugs, one small source edit each, and the fast tests that must catch them.

Each entry replaces ``old`` (which must occur exactly once in ``file``) by ``new``. ``tests`` are pytest
node ids (files or ``file::test``) that run against the mutated copy; the bug counts as caught when one of
them fails. ``python tests/mutations/run.py`` plants them one at a time and writes the table;
``tests/test_mutation_catalogue.py`` keeps every entry applicable as the code changes. When a test is added
for a new method, add the bug it exists to catch here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str  # what the bug does to the model


PIPE = "tests/test_correct_pipelines.py"

MUTATIONS: tuple[Mutation, ...] = (
    # -- the three bugs the issue found surviving --
    Mutation(
        "dsq-column-scale-not-absorbed",
        "quant/d2quant.py",
        'absorb_column_scale(block.get_submodule(rel.replace("down_proj", "up_proj")), q.col_scale)',
        "q.col_scale  # mutated: not absorbed",
        (f"{PIPE}::test_d2quant_mlp_is_the_one_rebuilt_from_dsq_codes_and_the_absorbed_column_scale",),
        "down_proj's DSQ column scale is dropped: every MLP output is off by a per-channel factor",
    ),
    Mutation(
        "gptaq-ignores-the-float-stream",
        "quant/d2quant.py",
        "P = moment(xf, x)",
        "P = moment(x, x)",
        (f"{PIPE}::test_gptaq_hands_the_solver_the_closed_form_asymmetric_target",),
        "GPTAQ's cross moment uses the quantized inputs: the target is W and GPTAQ silently becomes GPTQ",
    ),
    Mutation(
        "gptq-no-update-of-later-column-blocks",
        "quant/gptq.py",
        "W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]",
        "W[:, i2:] -= 0 * Err1 @ Hinv[i1:i2, i2:]",
        (f"{PIPE}::test_gptq_solver_matches_a_plain_column_by_column_gptq",),
        "errors are fed back only inside each lazy block of 128 columns",
    ),
    # -- GPTQ and the sequential driver --
    Mutation(
        "gptq-no-error-feedback",
        "quant/gptq.py",
        "err = (w - deq) / Hinv1[i, i]",
        "err = 0 * (w - deq) / Hinv1[i, i]",
        (f"{PIPE}::test_gptq_solver_matches_a_plain_column_by_column_gptq",),
        "GPTQ degrades to rounding to nearest",
    ),
    Mutation(
        "gptq-stream-not-advanced",
        "quant/blockwise.py",
        "        runner.advance(block)",
        "        pass  # mutated: runner.advance(block)",
        (f"{PIPE}::test_gptq_hessians_come_from_the_quantized_stream",),
        "every block is calibrated on the embeddings (block 0's inputs)",
    ),
    Mutation(
        "staged-o-proj-sees-float-qkv",
        "quant/blockwise.py",
        "    visit(qkv, xa)\n    attn_in = each(",
        "    attn_in = each(lambda c: _input_to(role(\"o\"), lambda: attn(hidden_states=c, **block_kwargs)), xa)\n"
        "    visit(qkv, xa)\n    _unused = each(",
        (f"{PIPE}::test_d2quant_gptq_backend_hessians_come_from_the_quantized_stream",),
        "o_proj's Hessian is measured before q/k/v were quantized",
    ),
    # -- grid and packing --
    Mutation(
        "grid-zero-point-truncated",
        "quant/grid.py",
        "zero = torch.round(-xmin / scale).clamp(0, maxq)",
        "zero = (-xmin / scale).clamp(0, maxq)",
        ("tests/test_grid.py::test_quantize_dequantize_roundtrip",),
        "asymmetric zero-points are truncated when stored: up to a whole step of bias per group",
    ),
    Mutation(
        "packing-3bit-codes-straddle",
        "quant/packing.py",
        "return 32 // bits",
        "return (32 + bits - 1) // bits",
        ("tests/test_packing.py",),
        "11 three-bit codes per word: the last one loses its top bit",
    ),
    # -- DSQ, DAC, rotation --
    Mutation(
        "dsq-no-gptq-feedback",
        "quant/dsq.py",
        "    if H is None:\n        codes = torch.zeros(out, n, dtype=torch.long, device=W.device)",
        "    if True:\n        codes = torch.zeros(out, n, dtype=torch.long, device=W.device)",
        ("tests/test_dsq.py::test_gptq_feedback_lowers_output_error",),
        "DSQ ignores the Hessian: no error feedback between columns",
    ),
    Mutation(
        "dac-bias-sign-flipped",
        "quant/d2quant.py",
        "mu = (float_in[stage][:, k:] - xq[:, k:]).mean((0, 1))",
        "mu = (xq[:, k:] - float_in[stage][:, k:]).mean((0, 1))",
        ("tests/test_d2quant.py::test_dac_bias_is_teacher_minus_student",),
        "DAC doubles the drift instead of removing it",
    ),
    Mutation(
        "rotation-writers-not-rotated",
        "quant/rotation.py",
        "            left(lin.weight)\n",
        "            pass  # mutated: left(lin.weight)\n",
        ("tests/test_rotation.py::test_rotated_tiny_model_is_the_same_function",),
        "o_proj/down_proj write into the unrotated stream: a different function",
    ),
    # -- checkpoints and the GPTQ format --
    Mutation(
        "checkpoint-checksums-not-checked",
        "quant/checkpoint.py",
        "if _sha256(f) != digest:",
        "if False:",
        ("tests/test_checkpoint.py::test_altered_byte_detected",),
        "a flipped byte in the weights loads as a different model",
    ),
    Mutation(
        "gptq-v1-zero-not-restored",
        "quant/gptq_format.py",
        "zeros = zeros + 1  # v1 stores zero - 1",
        "zeros = zeros + 0  # v1 stores zero - 1",
        ("tests/test_correct_gptq_format.py::test_v1_zero_points_import_exactly_up_to_the_top_of_the_field",),
        "every imported v1 zero-point is one too small",
    ),
    Mutation(
        "gptq-v1-8bit-zero-wraps",
        "quant/gptq_format.py",
        "if int(zeros.max()) > ZERO_MAX:",
        "if False:",
        ("tests/test_correct_gptq_format.py::test_v1_8bit_zero_field_0xff_is_refused_not_wrapped",),
        "the issue's live bug: 8-bit v1 field 0xFF (zero-point 256) wraps to 0",
    ),
    # -- atomic writes --
    Mutation(
        "atomic-overwrite-in-two-renames",
        "quant/atomic.py",
        "    elif _exchange(tmp, out):",
        "    elif False:",
        ("tests/test_atomic.py::test_overwrite_swaps_in_one_step",),
        "the old two-rename swap: a kill between the renames leaves no checkpoint at all",
    ),
    Mutation(
        "atomic-dead-writers-leftovers-kept",
        "quant/atomic.py",
        "        if m and not _alive(int(m[2])):",
        "        if False:",
        ("tests/test_atomic.py::test_save_killed_mid_write_keeps_old_checkpoint",),
        "a SIGKILLed writer's temporary folder stays next to the output forever",
    ),
    Mutation(
        "atomic-live-writer-cleaned-up",
        "quant/atomic.py",
        "        if m and not _alive(int(m[2])):",
        "        if m:",
        ("tests/test_atomic.py::test_live_writer_folder_kept_dead_leftovers_removed",),
        "a second writer deletes the folder a running writer is filling",
    ),
    Mutation(
        "atomic-old-checkpoint-not-restored",
        "quant/atomic.py",
        "            os.rename(olds[0], out)",
        "            raise OSError",
        ("tests/test_atomic.py::test_fallback_killed_between_renames_recovers_old",),
        "after a kill between the fallback's renames the old checkpoint is never put back",
    ),
    Mutation(
        "gptq-export-written-in-place",
        "quant/gptq_format.py",
        "    with atomic_dir(out) as tmp:\n        save_file(state,",
        "    out.mkdir(exist_ok=True)\n    for tmp in [out]:\n        save_file(state,",
        ("tests/test_atomic.py::test_gptq_export_error_and_kill_keep_old_export",),
        "a failed --overwrite export leaves a half-written GPTQ folder in place of the old one",
    ),
    # -- activation and KV quantization, perplexity, RTN through the CLI --
    Mutation(
        "static-act-scale-not-searched",
        "quant/inputops.py",
        "best = float(ratios[int(torch.argmin(err[n]))])",
        "best = 1.0",
        ("tests/test_correct_actquant.py::test_static_scale_is_the_argmin_of_the_clip_error",),
        "the static activation scale is the plain absolute maximum: no clip search",
    ),
    Mutation(
        "static-act-calibration-sees-quantized-inputs",
        "quant/inputops.py",
        "            self._observe(x)\n            return x",
        "            self._observe(x)",
        ("tests/test_correct_actquant.py::test_static_scale_is_the_argmin_of_the_clip_error",),
        "calibration observes inputs already quantized with the placeholder scale",
    ),
    Mutation(
        "kv-quantized-before-rope",
        "quant/inputops.py",
        "        key, value = fake_quant_tokens(key, cfg), fake_quant_tokens(value, cfg)",
        "        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb\n\n        cos, sin = LlamaRotaryEmbedding(module.config)(key, kwargs[\"position_ids\"])\n        raw = apply_rotary_pos_emb(key, key, cos, -sin)[1]  # undo RoPE: quantize the pre-RoPE key\n        key, value = apply_rotary_pos_emb(key, fake_quant_tokens(raw, cfg), cos, sin)[1], fake_quant_tokens(value, cfg)",  # noqa: E501
        ("tests/test_correct_actquant.py::test_kv_cache_is_per_token_per_head_after_rope",),
        "keys are quantized before RoPE, so the cache that attention reads is off the grid",
    ),
    Mutation(
        "kv-scale-per-channel-not-per-token",
        "quant/inputops.py",
        "key, value = fake_quant_tokens(key, cfg), fake_quant_tokens(value, cfg)",
        "key, value = fake_quant_tokens(key.transpose(-1, -2), cfg).transpose(-1, -2), fake_quant_tokens(value, cfg)",
        ("tests/test_correct_actquant.py::test_kv_cache_is_per_token_per_head_after_rope",),
        "one KV scale per head channel over all tokens instead of per token and head",
    ),
    Mutation(
        "act-int4-qmax-off-by-one",
        "quant/inputops.py",
        "qmax = 2 ** (cfg.bits - 1) - 1",
        "qmax = 2 ** (cfg.bits - 1)",
        ("tests/test_fpt.py::test_fake_quant_tokens_levels_and_straight_through",),
        "symmetric INT4 activations use 17 levels",
    ),
    Mutation(
        "ppl-mean-of-exp",
        "quant/perplexity.py",
        "\"ppl\": math.exp(mean_nll)",
        "\"ppl\": sum(math.exp(x) for x in nlls) / n",
        ("tests/test_correct_perplexity.py",),
        "perplexity is the mean of per-window perplexities, not exp of the mean NLL",
    ),
    Mutation(
        "ppl-labels-not-shifted",
        "quant/perplexity.py",
        "F.cross_entropy(logits, window[0, 1:])",
        "F.cross_entropy(logits, window[0, :-1])",
        ("tests/test_correct_perplexity.py",),
        "each token is scored against itself instead of the next token",
    ),
    Mutation(
        "ppl-ignores-max-windows",
        "quant/perplexity.py",
        "n = total if not max_windows else min(total, max_windows)",
        "n = total",
        ("tests/test_correct_perplexity.py",),
        "--max-windows is ignored: evaluation runs on every window",
    ),
    Mutation(
        "grid-scale-over-2-to-the-bits",
        "quant/grid.py",
        "        scale = (xmax - xmin) / maxq",
        "        scale = (xmax - xmin) / (maxq + 1)",
        ("tests/test_cli.py::test_tiny_model_is_really_quantized",),
        "min-max scale divides the range by 2^bits instead of 2^bits - 1",
    ),
    Mutation(
        "grid-codes-from-fp32-scale",
        "quant/grid.py",
        "scale = scale.clamp(min=1e-8).to(torch.float16).to(torch.float32)",
        "scale = scale.clamp(min=1e-8)",
        ("tests/test_correct_grid.py",),
        "codes are rounded with the fp32 scale, the checkpoint stores fp16: reloads differ near boundaries",
    ),
    # -- from the review of tests that could not fail --
    Mutation(
        "grid-sym-scale-off-by-one-level",
        "quant/grid.py",
        "scale = 2 * amax / maxq",
        "scale = 2 * amax / (maxq + 1)",
        ("tests/test_grid.py::test_quantize_dequantize_roundtrip",),
        "symmetric groups waste a level: the scale is too small and the top is clipped",
    ),
    Mutation(
        "grid-zero-not-representable",
        "quant/grid.py",
        "xmin = torch.minimum(xmin, torch.zeros_like(xmin))",
        "xmin = xmin",
        ("tests/test_grid.py::test_quantize_dequantize_roundtrip",),
        "a group of one sign cannot represent 0",
    ),
    Mutation(
        "gptq-dead-inputs-not-zeroed",
        "quant/gptq.py",
        "    W[:, dead] = 0\n",
        "    pass  # mutated: W[:, dead] = 0\n",
        ("tests/test_gptq.py::test_dead_inputs_do_not_break_gptq",),
        "weights of inputs that never fire keep arbitrary codes",
    ),
    Mutation(
        "dsq-sign-table-inverted",
        "quant/dsq.py",
        "rows = [[1.0 if (code >> j) & 1 else -1.0",
        "rows = [[-1.0 if (code >> j) & 1 else 1.0",
        ("tests/test_dsq.py::test_sign_planes_round_trip_exactly",),
        "DSQ's decoder reads every sign plane inverted",
    ),
    Mutation(
        "staged-gate-up-sees-the-residual",
        "quant/blockwise.py",
        "    visit(gate_up, xc)\n",
        "    visit(gate_up, h)\n",
        ("tests/test_d2quant.py::test_staged_block_is_the_block",),
        "gate/up are calibrated on the residual stream instead of the post-attention norm's output",
    ),
    Mutation(
        "gptaq-alpha-ignored",
        "quant/d2quant.py",
        "return (w64 + alpha * torch.linalg.solve(",
        "return (w64 + torch.linalg.solve(",
        ("tests/test_d2quant.py::test_gptaq_target_without_drift_is_the_weight",),
        "GPTAQ applies the whole asymmetric correction, not alpha of it",
    ),
    Mutation(
        "nsds-gqa-heads-mapped-round-robin",
        "quant/nsds.py",
        "kv = h // group",
        "kv = h % n_kv",
        ("tests/test_nsds.py::test_scores_on_gqa_model_and_outlier_layer_ranks_first",),
        "NSDS pairs query heads with the wrong key/value heads under GQA",
    ),
    Mutation(
        "nsds-mad-factor-dropped",
        "quant/nsds.py",
        "MAD_FACTOR = 1.4826",
        "MAD_FACTOR = 1.0",
        ("tests/test_nsds.py::test_mad_sigmoid_and_soft_or",),
        "MAD-sigmoid without the normal-consistency factor",
    ),
    Mutation(
        "rotation-last-group-not-rotated",
        "quant/hadamard.py",
        "return torch.block_diag(*[_hadamard(block)] * (n // block))",
        "return torch.block_diag(*[_hadamard(block)] * (n // block - 1), torch.eye(block, dtype=torch.float64))",
        ("tests/test_rotation.py::test_orders_without_construction",),
        "the groupwise rotation leaves its last group unrotated",
    ),
    Mutation(
        "gptq-v1-export-always-refused",
        "quant/gptq_format.py",
        "if v1 and any(bool((q.zeros == 0).any())",
        "if v1 and any(bool((q.zeros >= 0).any())",
        ("tests/test_export.py::test_gptq_round_trip_and_v2",),
        "every v1 export is refused",
    ),
    Mutation(
        "rtn-drops-linear-bias",
        "quant/quantizers.py",
        "QuantLinear.from_quantized(quantize_rtn(lin.weight, s), lin.bias), s.sym)",
        "QuantLinear.from_quantized(quantize_rtn(lin.weight, s), None), s.sym)",
        ("tests/test_adapters.py::test_roles_resolve_and_rtn_runs",),
        "RTN drops the biases of Qwen2's q/k/v",
    ),
    Mutation(
        "checkpoint-sums-not-sha256",
        "quant/checkpoint.py",
        "h = hashlib.sha256()",
        "h = hashlib.sha1()",
        ("tests/test_checkpoint.py::test_checksums_are_the_files_sha256",),
        "SHA256SUMS holds digests no other tool can verify",
    ),
)
