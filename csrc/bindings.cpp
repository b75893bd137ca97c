// The one torch-aware file of the CUDA fallback: checks tensors, takes the current stream,
// runs the GEMMs (cuBLAS via ATen) and calls the torch-free launchers of csrc/*.cu.
// Outputs are allocated by unipelt_fast/_cuda.py (unipelt_fast._alloc.new_output, so that
// UNIPELT_NAN_FILL=1 catches unwritten elements) and filled here; scratch is allocated here.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <climits>
#include <optional>

#include "launchers.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int dtype_tag(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return UF_F32;
    case at::kHalf:
      return UF_F16;
    case at::kBFloat16:
      return UF_BF16;
    default:
      TORCH_CHECK(false, "unipelt_fast cuda: ", name, " must be float16, bfloat16 or float32, got ",
                  t.scalar_type());
  }
  return UF_F32;  // unreachable
}

void check_cuda(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "unipelt_fast cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "unipelt_fast cuda: ", name, " is on ", t.device(),
              ", expected ", like.device());
}

void check_same(const Tensor& t, const Tensor& like, const char* name) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "unipelt_fast cuda: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
}

void check_out(const Tensor& t, const Tensor& like, at::ScalarType dt, const char* name) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "unipelt_fast cuda: output ", name,
              " must be a contiguous ", dt, " tensor");
}

void ok(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "unipelt_fast cuda: ", what, " failed: ", cudaGetErrorString(e));
}

int as_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "unipelt_fast cuda: ", name, " = ", v, " is out of range");
  return static_cast<int>(v);
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// ---- prefix_attention ----------------------------------------------------------------------

struct AttnInputs {
  UfAttnArgs a;
  Tensor idx, gate, kpm;  // contiguous copies kept alive for the launch
};

// attn_bias: a (B, H, Lq, P + Lk) view read through its strides (never copied).
void set_attn_bias(UfAttnArgs& a, const Tensor& q, const OptTensor& bias) {
  if (!has(bias)) return;
  check_cuda(*bias, q, "attn_bias");
  TORCH_CHECK(bias->scalar_type() == q.scalar_type() || bias->scalar_type() == at::kFloat,
              "unipelt_fast cuda: attn_bias must have q's dtype or float32");
  TORCH_CHECK(bias->dim() == 4 && bias->size(0) == a.B && bias->size(1) == a.H &&
                  bias->size(2) == a.Lq && bias->size(3) == a.P + a.Lk,
              "unipelt_fast cuda: attn_bias must be a (B, H, Lq, P + Lk) view");
  a.bias = bias->data_ptr();
  a.bias_f32 = bias->scalar_type() == at::kFloat ? 1 : 0;
  for (int i = 0; i < 4; ++i) a.sb[i] = bias->stride(i);
}

AttnInputs attn_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                     const Tensor& pv, const Tensor& idx, const OptTensor& gate,
                     const OptTensor& kpm, bool causal, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && pk.dim() == 4 && pv.dim() == 4,
              "unipelt_fast cuda: prefix_attention expects 4-D q, k, v, prefix_k, prefix_v");
  check_cuda(q, q, "q");
  dtype_tag(q, "q");
  check_same(k, q, "k");
  check_same(v, q, "v");
  check_same(pk, q, "prefix_k");
  check_same(pv, q, "prefix_v");
  check_cuda(idx, q, "prefix_index");
  TORCH_CHECK(k.sizes() == v.sizes() && pk.sizes() == pv.sizes(),
              "unipelt_fast cuda: k/v and prefix_k/prefix_v shapes must match");
  AttnInputs in;
  UfAttnArgs& a = in.a;
  a.B = as_int(q.size(0), "B");
  a.H = as_int(q.size(1), "H");
  a.Lq = as_int(q.size(2), "Lq");
  a.D = as_int(q.size(3), "D");
  a.Hkv = as_int(k.size(1), "Hkv");
  a.Lk = as_int(k.size(2), "Lk");
  a.T = as_int(pk.size(0), "T");
  a.P = as_int(pk.size(2), "P");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && pk.size(1) == k.size(1) &&
                  pk.size(3) == q.size(3),
              "unipelt_fast cuda: prefix_attention shapes do not agree");
  TORCH_CHECK(a.Hkv >= 1 && a.H % a.Hkv == 0,
              "unipelt_fast cuda: query heads must be a multiple of kv heads");
  TORCH_CHECK(a.D >= 1 && a.D <= UF_MAX_HEAD_DIM, "unipelt_fast cuda: prefix_attention supports "
              "head dims 1..", UF_MAX_HEAD_DIM, " on backend='cuda', got ", a.D,
              "; use backend='triton' or 'eager'");
  in.idx = idx.to(at::kLong).contiguous();
  TORCH_CHECK(in.idx.numel() == q.size(0), "unipelt_fast cuda: prefix_index must have B entries");
  a.prefix_index = in.idx.data_ptr<int64_t>();
  a.gate = nullptr;
  if (has(gate)) {
    check_cuda(*gate, q, "prefix_gate");
    in.gate = gate->to(at::kFloat).contiguous();
    TORCH_CHECK(in.gate.numel() == 2 * q.size(0), "unipelt_fast cuda: prefix_gate must be (B, 2)");
    a.gate = in.gate.data_ptr<float>();
  }
  a.kpm = nullptr;
  if (has(kpm)) {
    check_cuda(*kpm, q, "key_padding_mask");
    in.kpm = kpm->to(at::kBool).contiguous();
    TORCH_CHECK(in.kpm.numel() == k.size(0) * k.size(2),
                "unipelt_fast cuda: key_padding_mask must be (B, Lk)");
    a.kpm = in.kpm.data_ptr<bool>();
  }
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.pk = pk.data_ptr();
  a.pv = pv.data_ptr();
  for (int i = 0; i < 4; ++i) {
    a.sq[i] = q.stride(i);
    a.sk[i] = k.stride(i);
    a.sv[i] = v.stride(i);
    a.spk[i] = pk.stride(i);
    a.spv[i] = pv.stride(i);
  }
  a.causal = causal ? 1 : 0;
  a.scale = static_cast<float>(scale);
  return in;
}

void prefix_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                              const Tensor& pv, const Tensor& idx, const OptTensor& gate,
                              const OptTensor& kpm, bool causal, double scale, Tensor out,
                              Tensor lse, const OptTensor& attn_bias) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttnInputs in = attn_args(q, k, v, pk, pv, idx, gate, kpm, causal, scale);
  set_attn_bias(in.a, q, attn_bias);
  check_out(out, q, q.scalar_type(), "out");
  check_out(lse, q, at::kFloat, "lse");
  TORCH_CHECK(out.sizes() == q.sizes() && lse.numel() == q.numel() / q.size(3),
              "unipelt_fast cuda: out/lse have the wrong shape");
  ok(uf_prefix_attention_forward(in.a, dtype_tag(q, "q"), out.data_ptr(), lse.data_ptr<float>(),
                                 stream()),
     "prefix_attention forward");
}

void prefix_attention_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& pk, const Tensor& pv,
                               const Tensor& idx, const OptTensor& gate, const OptTensor& kpm,
                               const Tensor& out, const Tensor& lse, bool causal, double scale,
                               Tensor dq, Tensor dk, Tensor dv, Tensor dpk, Tensor dpv,
                               OptTensor dgate, const OptTensor& attn_bias) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttnInputs in = attn_args(q, k, v, pk, pv, idx, gate, kpm, causal, scale);
  set_attn_bias(in.a, q, attn_bias);
  const auto dt = q.scalar_type();
  const Tensor go = grad_out.contiguous();
  const Tensor o = out.contiguous();
  const Tensor l = lse.contiguous();
  check_same(go, q, "grad_out");
  check_same(o, q, "out");
  TORCH_CHECK(go.sizes() == q.sizes() && o.sizes() == q.sizes() && l.numel() == o.numel() / q.size(3),
              "unipelt_fast cuda: grad_out/out/lse have the wrong shape");
  TORCH_CHECK(l.scalar_type() == at::kFloat, "unipelt_fast cuda: lse must be float32");
  check_out(dq, q, dt, "dq");
  check_out(dk, q, dt, "dk");
  check_out(dv, q, dt, "dv");
  check_out(dpk, q, dt, "dprefix_k");
  check_out(dpv, q, dt, "dprefix_v");
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes() &&
                  dpk.sizes() == pk.sizes() && dpv.sizes() == pv.sizes(),
              "unipelt_fast cuda: gradient outputs have the wrong shape");
  float* dg = nullptr;
  if (has(gate)) {
    TORCH_CHECK(has(dgate), "unipelt_fast cuda: dprefix_gate output missing");
    check_out(*dgate, q, at::kFloat, "dprefix_gate");
    TORCH_CHECK(dgate->numel() == 2 * q.size(0), "unipelt_fast cuda: dprefix_gate must be (B, 2)");
    dg = dgate->data_ptr<float>();
  }
  const int64_t nf = uf_prefix_attention_workspace_floats(in.a);
  const int64_t ni = uf_prefix_attention_workspace_ints(in.a);
  Tensor ws = at::empty({nf > 0 ? nf : 1}, q.options().dtype(at::kFloat));
  Tensor iws = at::empty({ni > 0 ? ni : 1}, q.options().dtype(at::kInt));
  ok(uf_prefix_attention_backward(in.a, dtype_tag(q, "q"), go.data_ptr(), o.data_ptr(),
                                  l.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                                  dv.data_ptr(), dpk.data_ptr(), dpv.data_ptr(), dg,
                                  ws.data_ptr<float>(), iws.data_ptr<int>(), stream()),
     "prefix_attention backward");
}

// ---- bias_only_linear ----------------------------------------------------------------------

Tensor colsum_partials(int64_t M, int64_t N, const Tensor& like) {
  const int64_t n = static_cast<int64_t>(uf_colsum_chunks(M)) * N;
  return at::empty({n > 0 ? n : 1}, like.options().dtype(at::kFloat));
}

void bias_only_linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t act,
                              Tensor y, Tensor pre) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(x, x, "x");
  const int dt = dtype_tag(x, "x");
  check_same(weight, x, "weight");
  check_same(bias, x, "bias");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                  bias.numel() == weight.size(0),
              "unipelt_fast cuda: bias_only_linear shapes do not agree");
  const int64_t M = x.size(0), N = weight.size(0);
  check_out(y, x, x.scalar_type(), "y");
  TORCH_CHECK(y.numel() == M * N, "unipelt_fast cuda: y has the wrong shape");
  void* pre_ptr = nullptr;
  if (pre.numel() > 0) {
    check_out(pre, x, x.scalar_type(), "pre");
    TORCH_CHECK(pre.numel() == M * N, "unipelt_fast cuda: pre has the wrong shape");
    pre_ptr = pre.data_ptr();
  }
  const Tensor mm = at::matmul(x, weight.t()).contiguous();
  const Tensor b = bias.contiguous();
  ok(uf_linear_epilogue(mm.data_ptr(), b.data_ptr(), y.data_ptr(), pre_ptr, M, N,
                        static_cast<int>(act), dt, stream()),
     "bias_only_linear forward");
}

void bias_only_linear_backward(const Tensor& grad_y, const Tensor& weight, const Tensor& saved,
                               int64_t act, Tensor dx, Tensor dbias) {
  const c10::cuda::CUDAGuard guard(grad_y.device());
  check_cuda(grad_y, grad_y, "grad_y");
  const int dt = dtype_tag(grad_y, "grad_y");
  check_same(weight, grad_y, "weight");
  const Tensor gy = grad_y.contiguous();
  const int64_t M = gy.size(0), N = gy.size(1);
  TORCH_CHECK(weight.size(0) == N, "unipelt_fast cuda: grad_y and weight do not agree");
  check_out(dx, gy, gy.scalar_type(), "dx");
  check_out(dbias, gy, gy.scalar_type(), "dbias");
  const bool identity = act == UF_IDENTITY;
  Tensor sv;
  if (!identity) {
    sv = saved.contiguous();
    check_same(sv, gy, "saved");
    TORCH_CHECK(sv.numel() == M * N, "unipelt_fast cuda: saved has the wrong shape");
  }
  Tensor dpre = identity ? gy : at::empty_like(gy);
  Tensor partials = colsum_partials(M, N, gy);
  ok(uf_linear_backward(gy.data_ptr(), identity ? nullptr : sv.data_ptr(),
                        identity ? nullptr : dpre.data_ptr(), dbias.data_ptr(),
                        partials.data_ptr<float>(), M, N, static_cast<int>(act), dt, stream()),
     "bias_only_linear backward");
  at::mm_out(dx, dpre, weight);
}

// ---- bias_only_layer_norm ------------------------------------------------------------------

void bias_only_layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  double eps, Tensor y, Tensor mean, Tensor rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(x, x, "x");
  const int dt = dtype_tag(x, "x");
  check_same(weight, x, "weight");
  check_same(bias, x, "bias");
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1) && bias.numel() == x.size(1),
              "unipelt_fast cuda: bias_only_layer_norm shapes do not agree");
  const int64_t M = x.size(0), N = x.size(1);
  check_out(y, x, x.scalar_type(), "y");
  check_out(mean, x, at::kFloat, "mean");
  check_out(rstd, x, at::kFloat, "rstd");
  TORCH_CHECK(y.numel() == M * N && mean.numel() == M && rstd.numel() == M,
              "unipelt_fast cuda: outputs have the wrong shape");
  const Tensor w = weight.contiguous(), b = bias.contiguous();
  ok(uf_layer_norm_forward(x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), b.data_ptr(),
                           y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N,
                           static_cast<float>(eps), dt, stream()),
     "bias_only_layer_norm forward");
}

void bias_only_layer_norm_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                   const Tensor& mean, const Tensor& rstd, Tensor dx,
                                   Tensor dbias) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(x, x, "x");
  const int dt = dtype_tag(x, "x");
  const Tensor gy = grad_y.contiguous();
  check_same(gy, x, "grad_y");
  check_same(weight, x, "weight");
  TORCH_CHECK(x.dim() == 2 && gy.sizes() == x.sizes() && weight.numel() == x.size(1),
              "unipelt_fast cuda: bias_only_layer_norm shapes do not agree");
  const int64_t M = x.size(0), N = x.size(1);
  const Tensor mu = mean.contiguous(), rs = rstd.contiguous(), w = weight.contiguous();
  TORCH_CHECK(mu.scalar_type() == at::kFloat && rs.scalar_type() == at::kFloat &&
                  mu.numel() == M && rs.numel() == M,
              "unipelt_fast cuda: mean/rstd must be float32 (M,)");
  check_out(dx, x, x.scalar_type(), "dx");
  check_out(dbias, x, x.scalar_type(), "dbias");
  Tensor partials = colsum_partials(M, N, x);
  ok(uf_layer_norm_backward(gy.data_ptr(), x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(),
                            mu.data_ptr<float>(), rs.data_ptr<float>(), dx.data_ptr(),
                            dbias.data_ptr(), partials.data_ptr<float>(), M, N, dt, stream()),
     "bias_only_layer_norm backward");
}

// ---- gated_adapter -------------------------------------------------------------------------
// gate_mode: 0 no gate, 1 token, 2 mean.

void gated_adapter_forward(const Tensor& x, const Tensor& w_down, const OptTensor& b_down,
                           const Tensor& w_up, const OptTensor& b_up, const OptTensor& residual,
                           const OptTensor& w_gate, const OptTensor& b_gate,
                           const OptTensor& gate_mask, int64_t gate_mode, int64_t act,
                           double scaling, Tensor out, Tensor z, Tensor s) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(x, x, "x");
  const int dt = dtype_tag(x, "x");
  TORCH_CHECK(x.dim() == 3, "unipelt_fast cuda: gated_adapter expects x (B, L, d)");
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), M = B * L;
  check_same(w_down, x, "w_down");
  check_same(w_up, x, "w_up");
  const int r = as_int(w_down.size(0), "r");
  TORCH_CHECK(w_down.size(1) == d && w_up.size(0) == d && w_up.size(1) == r,
              "unipelt_fast cuda: gated_adapter weight shapes do not agree");
  const bool gated = gate_mode != 0;
  TORCH_CHECK(gated == has(w_gate), "unipelt_fast cuda: gate_mode and w_gate disagree");
  check_out(out, x, x.scalar_type(), "out");
  check_out(z, x, at::kFloat, "z");
  TORCH_CHECK(out.numel() == M * d && z.numel() == M * r, "unipelt_fast cuda: out/z shape");
  Tensor bd, bu, bg, mask;
  if (has(b_down)) {
    bd = b_down->contiguous();
    check_same(bd, x, "b_down");
  }
  if (has(b_up)) {
    bu = b_up->contiguous();
    check_same(bu, x, "b_up");
  }
  Tensor wcat = w_down;
  if (gated) {
    check_same(*w_gate, x, "w_gate");
    check_out(s, x, at::kFloat, "s");
    TORCH_CHECK(s.numel() == M, "unipelt_fast cuda: s must be (B*L,)");
    wcat = at::cat({w_down, *w_gate}, 0);
    if (has(b_gate)) {
    bg = b_gate->contiguous();
    check_same(bg, x, "b_gate");
  }
    if (has(gate_mask)) {
      check_cuda(*gate_mask, x, "gate_mask");
      mask = gate_mask->to(at::kBool).contiguous();
      TORCH_CHECK(mask.numel() == M, "unipelt_fast cuda: gate_mask must be (B, L)");
    }
  }
  const Tensor res = has(residual) ? *residual : x;
  check_same(res, x, "residual");
  TORCH_CHECK(res.sizes() == x.sizes(), "unipelt_fast cuda: residual must match x");
  const Tensor x2 = x.reshape({M, d});
  // (M, r [+ 1]) in float32, also for half inputs: z and the gate logits feed the gate's
  // gradient, which does not survive half-precision rounding (see gated_adapter.cu).
  const Tensor mm = at::matmul(x2.to(at::kFloat), wcat.to(at::kFloat).t()).contiguous();
  Tensor h = at::empty({M, r}, x.options());
  Tensor g = at::empty({M > 0 ? M : 1}, x.options().dtype(at::kFloat));
  const cudaStream_t st = stream();
  ok(uf_adapter_down_epilogue(mm.data_ptr<float>(), bd.defined() ? bd.data_ptr() : nullptr,
                              bg.defined() ? bg.data_ptr() : nullptr, z.data_ptr<float>(),
                              h.data_ptr(), gated ? s.data_ptr<float>() : nullptr, M, r,
                              gated ? 1 : 0, static_cast<int>(act), dt, st),
     "gated_adapter down epilogue");
  ok(uf_adapter_gate(gated ? s.data_ptr<float>() : nullptr,
                     mask.defined() ? mask.data_ptr<bool>() : nullptr, g.data_ptr<float>(), B, L,
                     static_cast<int>(gate_mode), st),
     "gated_adapter gate");
  const Tensor u = at::matmul(h, w_up.t()).contiguous();  // (M, d)
  const int64_t sres[3] = {res.stride(0), res.stride(1), res.stride(2)};
  ok(uf_adapter_out_epilogue(u.data_ptr(), bu.defined() ? bu.data_ptr() : nullptr,
                             res.data_ptr(), sres, g.data_ptr<float>(), out.data_ptr(), B, L, d,
                             static_cast<float>(scaling), dt, st),
     "gated_adapter out epilogue");
}

void gated_adapter_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w_down,
                            const Tensor& w_up, const OptTensor& b_up,
                            bool residual_is_x, const OptTensor& w_gate,
                            const OptTensor& gate_mask, const Tensor& z, const Tensor& s,
                            int64_t gate_mode, int64_t act, double scaling, Tensor dx,
                            Tensor dw_down, OptTensor db_down, Tensor dw_up, OptTensor db_up,
                            OptTensor dw_gate, OptTensor db_gate) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(x, x, "x");
  const int dt = dtype_tag(x, "x");
  TORCH_CHECK(x.dim() == 3, "unipelt_fast cuda: gated_adapter expects x (B, L, d)");
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), M = B * L;
  const int r = as_int(w_down.size(0), "r");
  const bool gated = gate_mode != 0;
  const int R1 = r + (gated ? 1 : 0);
  TORCH_CHECK(gated == has(w_gate), "unipelt_fast cuda: gate_mode and w_gate disagree");
  check_same(w_down, x, "w_down");
  check_same(w_up, x, "w_up");
  const Tensor go = grad_out.contiguous();
  check_same(go, x, "grad_out");
  TORCH_CHECK(go.sizes() == x.sizes(), "unipelt_fast cuda: grad_out must match x");
  const Tensor zc = z.contiguous();
  TORCH_CHECK(zc.scalar_type() == at::kFloat && zc.numel() == M * r,
              "unipelt_fast cuda: z must be float32 (B*L, r)");
  check_out(dx, x, x.scalar_type(), "dx");
  check_out(dw_down, x, x.scalar_type(), "dw_down");
  check_out(dw_up, x, x.scalar_type(), "dw_up");
  TORCH_CHECK(dx.numel() == M * d, "unipelt_fast cuda: dx must match x");
  Tensor sc, mask;
  if (gated) {
    sc = s.contiguous();
    TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.numel() == M,
                "unipelt_fast cuda: s must be float32 (B*L,)");
    if (has(gate_mask)) {
      check_cuda(*gate_mask, x, "gate_mask");
      mask = gate_mask->to(at::kBool).contiguous();
      TORCH_CHECK(mask.numel() == M, "unipelt_fast cuda: gate_mask must be (B, L)");
    }
  }
  const cudaStream_t st = stream();
  const float* sp = gated ? sc.data_ptr<float>() : nullptr;
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor go2 = go.view({M, d});
  Tensor g = at::empty({M > 0 ? M : 1}, f32);
  ok(uf_adapter_gate(sp, mp, g.data_ptr<float>(), B, L, static_cast<int>(gate_mode), st),
     "gated_adapter gate");
  Tensor h = at::empty({M, r}, x.options());
  ok(uf_adapter_act(zc.data_ptr<float>(), h.data_ptr(), M * r, static_cast<int>(act), dt, st),
     "gated_adapter activation");
  Tensor bu;
  if (has(b_up)) {
    bu = b_up->contiguous();
    check_same(bu, x, "b_up");
  }
  Tensor u;  // the gate's gradient needs u = h @ w_up.T; in float32 (see bwd_up_kernel)
  if (gated) {
    Tensor h32 = at::empty({M, r}, f32);
    ok(uf_adapter_act(zc.data_ptr<float>(), h32.data_ptr(), M * r, static_cast<int>(act),
                      UF_F32, st),
       "gated_adapter activation");
    u = at::matmul(h32, w_up.to(at::kFloat).t()).contiguous();
  }
  Tensor da = at::empty({M, d}, x.options());
  Tensor dg = at::empty({M > 0 ? M : 1}, f32);
  ok(uf_adapter_bwd_up(go2.data_ptr(), g.data_ptr<float>(), gated ? u.data_ptr<float>() : nullptr,
                       bu.defined() ? bu.data_ptr() : nullptr, da.data_ptr(),
                       dg.data_ptr<float>(), M, d, static_cast<float>(scaling), dt, st),
     "gated_adapter backward (up)");
  const int64_t widest = d > R1 ? d : R1;
  Tensor partials = colsum_partials(M, widest, x);
  if (has(db_up)) {
    check_out(*db_up, x, x.scalar_type(), "db_up");
    ok(uf_colsum(da.data_ptr(), 0, dt, M, d, d, partials.data_ptr<float>(), db_up->data_ptr(), 0,
                 st),
       "gated_adapter db_up");
  }
  at::mm_out(dw_up, da.t(), h);                    // (d, r)
  const Tensor dh = at::matmul(da, w_up).contiguous();  // (M, r)
  Tensor ds = at::empty({M > 0 ? M : 1}, f32);
  if (gated)
    ok(uf_adapter_gate_backward(sp, mp, dg.data_ptr<float>(), ds.data_ptr<float>(), B, L,
                                static_cast<int>(gate_mode), st),
       "gated_adapter gate backward");
  Tensor dzc = at::empty({M, R1}, f32);
  Tensor dzc_x = at::empty({M, R1}, x.options());
  ok(uf_adapter_bwd_down(dh.data_ptr(), zc.data_ptr<float>(), ds.data_ptr<float>(),
                         dzc.data_ptr<float>(), dzc_x.data_ptr(), M, r, gated ? 1 : 0,
                         static_cast<int>(act), dt, st),
     "gated_adapter backward (down)");
  if (has(db_down)) {
    check_out(*db_down, x, x.scalar_type(), "db_down");
    ok(uf_colsum(dzc.data_ptr<float>(), 1, dt, M, r, R1, partials.data_ptr<float>(),
                 db_down->data_ptr(), 0, st),
       "gated_adapter db_down");
  }
  if (gated && has(db_gate)) {
    check_out(*db_gate, x, x.scalar_type(), "db_gate");
    ok(uf_colsum(dzc.data_ptr<float>() + r, 1, dt, M, 1, R1, partials.data_ptr<float>(),
                 db_gate->data_ptr(), 0, st),
       "gated_adapter db_gate");
  }
  const Tensor x2 = x.reshape({M, d});
  const Tensor wcat = gated ? at::cat({w_down, *w_gate}, 0) : w_down;
  if (gated) {
    TORCH_CHECK(has(dw_gate), "unipelt_fast cuda: dw_gate output missing");
    check_out(*dw_gate, x, x.scalar_type(), "dw_gate");
    const Tensor dwcat = at::matmul(dzc_x.t(), x2);  // (r + 1, d)
    dw_down.view({r, d}).copy_(dwcat.narrow(0, 0, r));
    dw_gate->view({1, d}).copy_(dwcat.narrow(0, r, 1));
  } else {
    at::mm_out(dw_down, dzc_x.t(), x2);
  }
  Tensor dx2 = dx.view({M, d});
  if (residual_is_x)
    at::addmm_out(dx2, go2, dzc_x, wcat);
  else
    at::mm_out(dx2, dzc_x, wcat);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unipelt_fast CUDA fallback (backend='cuda'); see unipelt_fast/_cuda.py";
  m.def("prefix_attention_forward", &prefix_attention_forward);
  m.def("prefix_attention_backward", &prefix_attention_backward);
  m.def("bias_only_linear_forward", &bias_only_linear_forward);
  m.def("bias_only_linear_backward", &bias_only_linear_backward);
  m.def("bias_only_layer_norm_forward", &bias_only_layer_norm_forward);
  m.def("bias_only_layer_norm_backward", &bias_only_layer_norm_backward);
  m.def("gated_adapter_forward", &gated_adapter_forward);
  m.def("gated_adapter_backward", &gated_adapter_backward);
}
