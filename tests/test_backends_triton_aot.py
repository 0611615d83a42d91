"""Ahead-of-time compile of every Triton kernel for an sm_90 (H100) target, with or without a GPU.

The interpreter runs kernels as numpy code, so it misses what only the compiler sees: type errors in
constexpr-pruned branches, loop-carried type changes, unsupported ops, ptxas failures. Here each kernel
is lowered all the way to a cubin with ``triton.compile(ASTSource, GPUTarget("cuda", 90, 32))`` in
configurations the launchers produce, and the elementwise step is checked to use 128-bit vector memory
accesses. Compiling needs the real (not interpreted) ``triton.jit``, so it runs in a subprocess without
``TRITON_INTERPRET``: this file is also that subprocess's script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

TARGET = ("cuda", 90, 32)
FLOAT_ARGS = {"clip_lo", "clip_hi", "phi", "tau1", "tau2", "momentum"}
# Arguments the JIT sees as multiples of 16 in a typical launch (aligned allocations, n % 16 == 0); the
# compiler only vectorises memory accesses it can prove aligned.
ALIGNED_ARGS = re.compile(r"(_ptr|_stride|^n)$")

# (name, kernel module, kernel, pointer dtypes (default fp32), constexprs, num_warps, expect 128-bit I/O)
STEP = ("guided_step", "guided_step_kernel")
RESCALE_PARTIAL = ("cfg_rescale_factor", "cfg_rescale_factor_partial_kernel")
LSE_GRAD = ("temperature_lse_grad", "temperature_lse_grad_kernel")
RMS_PARTIAL = ("per_sample_rms", "per_sample_rms_partial_kernel")
GRAM_PARTIAL = ("guidance_gram", "guidance_gram_partial_kernel")
STEP_OFF = dict(HAS_CFG=False, HAS_MFACTOR=False, HAS_G_SCORE=False, HAS_G_MEAN=False, HAS_NOISE=False,
                HAS_X0_PREV=False, HAS_X0_PREV2=False, LEARNED_VARIANCE=False, CLIP_MODE=0, STEP_FROM_PTR=False,
                WRITE_OUT=True, WRITE_X0=False, WRITE_OUT2=False, STEP_ROWS=False, SPARSE_CFG=False, COMBINE=False,
                HAS_EXTRA=False, EPS_FROM_UNCOND=False)
STEP_ALL = dict(STEP_OFF, HAS_CFG=True, HAS_MFACTOR=True, HAS_G_SCORE=True, HAS_G_MEAN=True, HAS_NOISE=True,
                HAS_X0_PREV=True, HAS_X0_PREV2=True, LEARNED_VARIANCE=True, CLIP_MODE=2, STEP_FROM_PTR=True,
                WRITE_X0=True)
BF16_IO = {p: "bf16" for p in ("x_ptr", "noise_ptr", "g_score_ptr", "out_ptr", "x0_out_ptr")}
ROW_MAPS = {"step_rows_ptr": "i64", "uncond_rows_ptr": "i64"}  # a heterogeneous batch's [B] index vectors
CASES = [
    ("step_cfg_ddim_fp32", *STEP, {}, dict(STEP_OFF, HAS_CFG=True, BLOCK=2048), 8, True),
    ("step_cfg_ddim_out2_fp16", *STEP, {p: "fp16" for p in ("x_ptr", "m_ptr", "out_ptr", "out2_ptr")},
     dict(STEP_OFF, HAS_CFG=True, WRITE_OUT2=True, BLOCK=2048), 8, True),
    ("step_all_terms_fp32_threshold_device_step", *STEP, {"step_ptr": "i64"}, dict(STEP_ALL, BLOCK=2048), 8,
     True),
    ("step_cfg_rescale_range_clip_bf16_sample_fp16_model", *STEP, dict(BF16_IO, m_ptr="fp16"),
     dict(STEP_OFF, HAS_CFG=True, HAS_MFACTOR=True, HAS_NOISE=True, HAS_G_SCORE=True, CLIP_MODE=1,
          WRITE_X0=True, BLOCK=1024), 4, True),
    ("step_learned_variance_mean_shift_fp16", *STEP,
     {p: "fp16" for p in ("x_ptr", "m_ptr", "g_mean_ptr", "noise_ptr", "out_ptr")},
     dict(STEP_OFF, HAS_G_MEAN=True, HAS_NOISE=True, LEARNED_VARIANCE=True, BLOCK=2048), 8, True),
    ("step_heterogeneous_sparse_cfg_step_rows_fp32", *STEP, ROW_MAPS,
     dict(STEP_OFF, HAS_CFG=True, SPARSE_CFG=True, STEP_ROWS=True, BLOCK=2048), 8, True),
    ("step_heterogeneous_all_terms_learned_variance_fp16", *STEP,
     dict(ROW_MAPS, **{p: "fp16" for p in ("x_ptr", "m_ptr", "g_mean_ptr", "noise_ptr", "out_ptr", "out2_ptr")}),
     dict(STEP_ALL, SPARSE_CFG=True, STEP_ROWS=True, WRITE_OUT2=True, BLOCK=1024), 4, True),
    ("step_per_row_steps_dense_cfg_int32_rows_bf16", *STEP, dict(BF16_IO, m_ptr="bf16", step_rows_ptr="i32"),
     dict(STEP_OFF, HAS_CFG=True, STEP_ROWS=True, CLIP_MODE=1, WRITE_X0=True, BLOCK=2048), 8, True),
    ("step_predict_x0_only_small_block", *STEP, {"x_ptr": "fp16", "x0_out_ptr": "fp16", "step_ptr": "i32"},
     dict(STEP_OFF, WRITE_OUT=False, WRITE_X0=True, CLIP_MODE=1, STEP_FROM_PTR=True, BLOCK=256), 1, False),
    # Guidance beyond CFG: the per-sample linear combine (with and without the extra stream), CFG++'s eps
    # from the uncond prediction (dense, combined and sparse), with every other term on top.
    ("step_combine_extra_fp32", *STEP, {}, dict(STEP_OFF, HAS_CFG=True, COMBINE=True, HAS_EXTRA=True, BLOCK=2048),
     8, True),
    ("step_combine_no_extra_eps_from_uncond_fp16_noise", *STEP,
     {p: "fp16" for p in ("x_ptr", "m_ptr", "noise_ptr", "out_ptr")},
     dict(STEP_OFF, HAS_CFG=True, COMBINE=True, EPS_FROM_UNCOND=True, HAS_NOISE=True, BLOCK=2048), 8, True),
    ("step_combine_extra_all_terms_learned_variance_bf16_extra_fp16", *STEP,
     dict(BF16_IO, m_ptr="bf16", extra_ptr="fp16", step_ptr="i64"),
     dict(STEP_ALL, COMBINE=True, HAS_EXTRA=True, EPS_FROM_UNCOND=True, WRITE_OUT2=True, BLOCK=1024), 4, True),
    ("step_cfg_pp_eps_from_uncond_fp32_x0_too", *STEP, {},
     dict(STEP_OFF, HAS_CFG=True, EPS_FROM_UNCOND=True, HAS_MFACTOR=True, WRITE_X0=True, CLIP_MODE=1,
          BLOCK=2048), 8, True),
    ("step_heterogeneous_sparse_cfg_eps_from_uncond_fp16", *STEP,
     dict(ROW_MAPS, **{p: "fp16" for p in ("x_ptr", "m_ptr", "noise_ptr", "out_ptr")}),
     dict(STEP_OFF, HAS_CFG=True, SPARSE_CFG=True, STEP_ROWS=True, EPS_FROM_UNCOND=True, HAS_NOISE=True,
          BLOCK=2048), 8, True),
    ("cfg_rescale_factor_partial_single_chunk_fp32", *RESCALE_PARTIAL, {},
     dict(SINGLE_CHUNK=True, BLOCK=4096), 8, False),
    ("cfg_rescale_factor_partial_chunks_bf16", *RESCALE_PARTIAL, {"m_ptr": "bf16"},
     dict(SINGLE_CHUNK=False, BLOCK=4096), 8, False),
    ("cfg_rescale_factor_combine", "cfg_rescale_factor", "cfg_rescale_factor_combine_kernel", {},
     dict(CHUNK=4096, BLOCK=256), 4, False),
    ("temperature_lse_grad_fp16_scaled", *LSE_GRAD,
     {"logits_ptr": "fp16", "out_ptr": "fp16", "labels_ptr": "i64"}, dict(HAS_SCALE=True, BLOCK=4096), 8,
     False),
    ("temperature_lse_grad_bf16_int32_labels", *LSE_GRAD,
     {"logits_ptr": "bf16", "out_ptr": "bf16", "labels_ptr": "i32"}, dict(HAS_SCALE=False, BLOCK=1024), 4,
     False),
    ("per_sample_rms_partial_single_chunk_fp16", *RMS_PARTIAL, {"x_ptr": "fp16"},
     dict(SINGLE_CHUNK=True, BLOCK=4096), 8, False),
    ("per_sample_rms_partial_chunks_bf16", *RMS_PARTIAL, {"x_ptr": "bf16"},
     dict(SINGLE_CHUNK=False, BLOCK=4096), 8, False),
    ("per_sample_rms_combine", "per_sample_rms", "per_sample_rms_combine_kernel", {}, dict(BLOCK=256), 4,
     False),
    ("guidance_gram_partial_cond_uncond_fp32", *GRAM_PARTIAL, {}, dict(HAS_EXTRA=False, MOMENTUM=False,
                                                                         BLOCK=4096), 8, False),
    ("guidance_gram_partial_extra_bf16", *GRAM_PARTIAL, {"m_ptr": "bf16", "extra_ptr": "bf16"},
     dict(HAS_EXTRA=True, MOMENTUM=False, BLOCK=4096), 8, False),
    # the in-place momentum update of e: the elementwise store of the first pass, 128-bit like the step's
    ("guidance_gram_partial_momentum_fp32", *GRAM_PARTIAL, {}, dict(HAS_EXTRA=True, MOMENTUM=True, BLOCK=4096),
     8, True),
    ("guidance_gram_partial_momentum_fp16_extra_fp32", *GRAM_PARTIAL, {"m_ptr": "fp16"},
     dict(HAS_EXTRA=True, MOMENTUM=True, BLOCK=1024), 4, True),
    ("guidance_gram_combine", "guidance_gram", "guidance_gram_combine_kernel", {}, dict(BLOCK=64), 4, False),
]


# ------------------------------------------------------------------------------------ subprocess side

def _signature(kernel, pointer_types, constexprs):
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            assert p.name in constexprs, f"constexpr {p.name} of {kernel.__name__} not set"
            sig[p.name] = "constexpr"
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = "*" + pointer_types.get(p.name, "fp32")
        elif p.name in FLOAT_ARGS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
        # (table_stride_col and the [B] index vectors' strides are 1 in practice, not multiples of 16)
        if ALIGNED_ARGS.search(p.name) and p.name not in ("table_stride_col", "step_rows_stride",
                                                          "uncond_rows_stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _compile_all() -> dict:
    """{case: {"error": str | None, "vector_ld": bool, "vector_st": bool}}, or {"probe_error": str}."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget(*TARGET)

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:  # can this triton build lower to a cubin here at all (backend, LLVM, ptxas)?
        triton.compile(ASTSource(probe, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128}),
                       target=target)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot compile on this machine"
        return {"probe_error": f"{type(exc).__name__}: {exc}"[:2000]}

    results = {}
    for name, module, kernel_name, pointer_types, constexprs, num_warps, _ in CASES:
        kernel = getattr(importlib.import_module(f"fastguide.kernels.{module}"), kernel_name)
        try:
            sig, attrs = _signature(kernel, pointer_types, constexprs)
            compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target,
                                      options={"num_warps": num_warps, "enable_fp_fusion": True})
            ptx = compiled.asm["ptx"]
            assert compiled.asm["cubin"], "empty cubin"
            results[name] = {"error": None, "vector_ld": bool(re.search(r"ld\.global(\.\w+)*\.v4", ptx)),
                             "vector_st": bool(re.search(r"st\.global(\.\w+)*\.v4", ptx))}
        except Exception as exc:  # noqa: BLE001 - reported per case to the test
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
    return results


# -------------------------------------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def aot_results():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"AOT compile script failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "probe_error" in results:
        pytest.skip("this triton build cannot compile a trivial kernel for sm_90 here, so the kernels cannot "
                    f"be checked ahead of time: {results['probe_error']}")
    return results


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90(aot_results, case):
    name, *_, expect_vector = case
    result = aot_results[name]
    assert result["error"] is None, result["error"]
    if expect_vector:
        assert result["vector_ld"] and result["vector_st"], \
            "the elementwise step lost its 128-bit loads/stores (alignment or layout regression)"


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1", "the AOT compile needs the real triton.jit"
    print(json.dumps(_compile_all()))
