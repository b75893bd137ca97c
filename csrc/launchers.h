// Host launchers of the CUDA fallback (backend="cuda"). Torch-free on purpose: the .cu
// files compile with nvcc alone, and csrc/bindings.cpp (the only file that sees torch)
// checks tensors, takes the current stream and calls these with raw pointers.
//
// Conventions shared by every launcher:
//   * `dtype` is a UfDtype tag: the element type of every floating tensor argument that
//     is not documented as float32.
//   * Strides are in elements. "contiguous" arguments must be exactly that.
//   * Return cudaSuccess, or the error of the first failed launch (cudaErrorInvalidValue
//     for an unsupported argument, e.g. a head dim above UF_MAX_HEAD_DIM).
//   * Reductions are deterministic: partial sums per block, then a fixed-order pass.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

enum UfDtype { UF_F32 = 0, UF_F16 = 1, UF_BF16 = 2 };

// Activation ids, in the order of unipelt_fast._validation.ACTIVATIONS.
enum UfAct { UF_RELU = 0, UF_GELU = 1, UF_GELU_TANH = 2, UF_SILU = 3, UF_TANH = 4, UF_IDENTITY = 5 };

#define UF_MAX_HEAD_DIM 256

// ---- prefix_attention ----------------------------------------------------------------------
// q (B,H,Lq,D), k/v (B,Hkv,Lk,D), prefix_k/prefix_v (T,Hkv,P,D): 4 strides each.
struct UfAttnArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* pk;
  const void* pv;
  const int64_t* prefix_index;  // (B,)
  const float* gate;            // (B, 2) contiguous or nullptr
  const bool* kpm;              // (B, Lk) contiguous or nullptr (true = real token)
  int64_t sq[4], sk[4], sv[4], spk[4], spv[4];
  int B, H, Hkv, Lq, Lk, P, T, D;
  int causal;
  float scale;
  // attn_bias: element (b, h, i, j) at b*sb[0] + h*sb[1] + i*sb[2] + j*sb[3] (stride 0 on
  // broadcast dims), j in [0, P + Lk) as [prefix ; tokens]; q's dtype, or float32 when
  // bias_f32. Added to the logits after the key gate, before the masks. nullptr = none.
  const void* bias = nullptr;
  int bias_f32 = 0;
  int64_t sb[4] = {0, 0, 0, 0};
};

// out (B,H,Lq,D) contiguous in dtype; lse (B,H,Lq) float32, natural log, -inf for rows
// with no visible key.
cudaError_t uf_prefix_attention_forward(const UfAttnArgs& a, int dtype, void* out, float* lse,
                                        cudaStream_t stream);

// grad_out/out (B,H,Lq,D) contiguous. dq (B,H,Lq,D), dk/dv (B,Hkv,Lk,D), dpk/dpv
// (T,Hkv,P,D): contiguous in dtype. dgate (B,2) float32 or nullptr (gate absent).
// workspace: float32 of uf_prefix_attention_workspace_floats(a) elements;
// iworkspace: int32 of uf_prefix_attention_workspace_ints(a) elements.
int64_t uf_prefix_attention_workspace_floats(const UfAttnArgs& a);
int64_t uf_prefix_attention_workspace_ints(const UfAttnArgs& a);
cudaError_t uf_prefix_attention_backward(const UfAttnArgs& a, int dtype, const void* grad_out,
                                         const void* out, const float* lse, void* dq, void* dk,
                                         void* dv, void* dpk, void* dpv, float* dgate,
                                         float* workspace, int* iworkspace,
                                         cudaStream_t stream);

// ---- shared epilogues (bias_only_linear.cu) --------------------------------------------------
// Column sums of a (M, N) matrix with row stride ld, deterministic: partials (nchunks, N)
// float32 then a fixed-order pass into out (N,) of out_dtype. `src_f32` selects a float32
// source instead of dtype.
int uf_colsum_chunks(int64_t M);
cudaError_t uf_colsum(const void* src, int src_f32, int dtype, int64_t M, int64_t N, int64_t ld,
                      float* partials, void* out, int out_f32, cudaStream_t stream);

// ---- bias_only_linear ------------------------------------------------------------------------
// mm (M,N) contiguous = x @ weight.T (computed by the caller). y = act(mm + bias);
// pre = mm + bias is written when pre != nullptr. All in dtype.
cudaError_t uf_linear_epilogue(const void* mm, const void* bias, void* y, void* pre, int64_t M,
                               int64_t N, int act, int dtype, cudaStream_t stream);
// dpre = grad_y * act'(saved) (saved: pre, or y for relu, unused for identity) into dpre
// (nullptr for identity: the caller uses grad_y), and dbias = column sums of dpre.
// partials: float32 (uf_colsum_chunks(M), N).
cudaError_t uf_linear_backward(const void* grad_y, const void* saved, void* dpre, void* dbias,
                               float* partials, int64_t M, int64_t N, int act, int dtype,
                               cudaStream_t stream);

// ---- bias_only_layer_norm --------------------------------------------------------------------
// x (M,N) with strides (sxm, sxn); weight, bias (N,); y (M,N) contiguous; mean, rstd (M,).
cudaError_t uf_layer_norm_forward(const void* x, int64_t sxm, int64_t sxn, const void* weight,
                                  const void* bias, void* y, float* mean, float* rstd, int64_t M,
                                  int64_t N, float eps, int dtype, cudaStream_t stream);
// grad_y (M,N) contiguous; dx (M,N) contiguous; dbias (N,); partials as uf_colsum.
cudaError_t uf_layer_norm_backward(const void* grad_y, const void* x, int64_t sxm, int64_t sxn,
                                   const void* weight, const float* mean, const float* rstd,
                                   void* dx, void* dbias, float* partials, int64_t M, int64_t N,
                                   int dtype, cudaStream_t stream);

// ---- gated_adapter ---------------------------------------------------------------------------
// Gate modes: 0 none, 1 token, 2 mean.
// Forward, step 1. mm (M, R1) contiguous float32 = x @ [w_down; w_gate].T, R1 = r + (gate ?
// 1 : 0). z (M,r) float32 = mm[:, :r] + b_down; h (M,r) dtype = act(z); s (M,) float32 =
// mm[:, r] + b_gate when gated. b_down/b_gate may be nullptr.
cudaError_t uf_adapter_down_epilogue(const float* mm, const void* b_down, const void* b_gate,
                                     float* z, void* h, float* s, int64_t M, int r, int gated,
                                     int act, int dtype, cudaStream_t stream);
// g (M,) float32: the gate of every row. token: sigmoid(s); mean: the (masked) mean of
// sigmoid(s) over each example's L rows (0 when it has no real token); none: 1.
// mask (B, L) contiguous or nullptr. M = B * L.
cudaError_t uf_adapter_gate(const float* s, const bool* mask, float* g, int64_t B, int64_t L,
                            int mode, cudaStream_t stream);
// Forward, step 2. u (M,d) contiguous = h @ w_up.T. out = res + g * scaling * (u + b_up),
// res (B,L,d) with strides sres; out contiguous.
cudaError_t uf_adapter_out_epilogue(const void* u, const void* b_up, const void* res,
                                    const int64_t sres[3], const float* g, void* out, int64_t B,
                                    int64_t L, int64_t d, float scaling, int dtype,
                                    cudaStream_t stream);
// Backward, step 1. da = grad_out * g * scaling (dtype, (M,d)); when u != nullptr (gated)
// also dg (M,) float32 = scaling * sum_c grad_out * (u + b_up), u (M,d) float32.
cudaError_t uf_adapter_bwd_up(const void* grad_out, const float* g, const float* u,
                              const void* b_up, void* da, float* dg, int64_t M, int64_t d,
                              float scaling, int dtype, cudaStream_t stream);
// Backward, step 2. ds (M,) float32, d loss / d gate logit, from dg (see uf_adapter_gate).
cudaError_t uf_adapter_gate_backward(const float* s, const bool* mask, const float* dg,
                                     float* ds, int64_t B, int64_t L, int mode,
                                     cudaStream_t stream);
// Backward, step 3. dh (M,r) contiguous dtype = da @ w_up. dzc (M, R1) float32 and dzc_x
// (M, R1) dtype: [dh * act'(z), ds].
cudaError_t uf_adapter_bwd_down(const void* dh, const float* z, const float* ds, float* dzc,
                                void* dzc_x, int64_t M, int r, int gated, int act, int dtype,
                                cudaStream_t stream);
// h = act(z) in dtype, or float32 with dtype UF_F32 (the backward recomputes it).
cudaError_t uf_adapter_act(const float* z, void* h, int64_t n, int act, int dtype,
                           cudaStream_t stream);
