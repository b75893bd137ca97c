// prefix_attention: softmax(q [g_k*Pk ; K]^T * scale) [g_v*Pv ; V] without building the
// concatenation. Keys are indexed j in [0, P + Lk): j < P are the example's (gated) prefix
// keys, always visible; j >= P are token keys t = j - P, masked by key_padding_mask and by
// the bottom-right causal rule t <= i + (Lk - Lq). A row with no visible key gives 0.
// An optional attn_bias (b, h, i, j), read through its strides, is added to the logits
// after the key gate (which the prefix rows of the K tile already carry).
//
// Tiled online softmax (the FlashAttention-2 recurrence, Dao 2023), on CUDA cores in
// float32 (correctness first; no tensor cores). Layout: one warp per query row (forward,
// dQ) or per key row (dK/dV); the lanes of a warp take the 32 keys (queries) of a shared-
// memory tile for the dot products, then own D/32 output dims each for the accumulation,
// broadcasting the probabilities with shuffles. Tiles are stored with a row stride of D + 1
// floats so the lane-per-row reads hit 32 different banks.
//
// Backward: Delta = rowsum(dO * O); dQ per query row; dK/dV per key row, looping over the
// query heads of its kv group in order. Prefix gradients are written per example and then
// summed per task in example order (no atomics): deterministic.
#include "common.cuh"

namespace {

constexpr int kWarps = 8;  // query (or key) rows per block
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;  // keys (or queries) per shared-memory tile
constexpr int kDpl = UF_MAX_HEAD_DIM / 32;  // output dims per lane
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ int64_t clamp_task(const UfAttnArgs& a, int b) {
  int64_t t = a.prefix_index[b];
  t = t < 0 ? 0 : t;
  return t >= a.T ? a.T - 1 : t;
}

// May query row i see key j (of example b)?
__device__ __forceinline__ bool key_visible(const UfAttnArgs& a, int b, int i, int j) {
  if (j < a.P) return true;
  const int t = j - a.P;
  if (t >= a.Lk) return false;
  if (a.kpm != nullptr && !a.kpm[static_cast<int64_t>(b) * a.Lk + t]) return false;
  if (a.causal && t > i + (a.Lk - a.Lq)) return false;
  return true;
}

// attn_bias[b, h, i, j] in base-2 logit units; 0 without a bias.
template <typename T>
__device__ __forceinline__ float bias2(const UfAttnArgs& a, int b, int h, int i, int j) {
  if (a.bias == nullptr) return 0.f;
  const int64_t off = b * a.sb[0] + h * a.sb[1] + static_cast<int64_t>(i) * a.sb[2] +
                      static_cast<int64_t>(j) * a.sb[3];
  const float x = a.bias_f32 ? static_cast<const float*>(a.bias)[off]
                             : uf::to_f(static_cast<const T*>(a.bias)[off]);
  return x * uf::kLog2e;
}

// Element d of key (or value) row j of example b, kv head hkv, prefix gated by g.
template <typename T>
__device__ __forceinline__ float kv_elem(const UfAttnArgs& a, const T* tok, const int64_t* st,
                                         const T* pre, const int64_t* sp, int b, int hkv,
                                         int64_t task, float g, int j, int d) {
  if (j < a.P)
    return g * uf::to_f(pre[task * sp[0] + hkv * sp[1] + static_cast<int64_t>(j) * sp[2] +
                            static_cast<int64_t>(d) * sp[3]]);
  return uf::to_f(tok[static_cast<int64_t>(b) * st[0] + hkv * st[1] +
                      static_cast<int64_t>(j - a.P) * st[2] + static_cast<int64_t>(d) * st[3]]);
}

// Keys j0 .. j0+31 into Ks/Vs (row stride ld); rows at or past nkeys are zero so that a
// zero probability never multiplies garbage.
template <typename T>
__device__ __forceinline__ void load_kv_tile(const UfAttnArgs& a, int b, int hkv, int64_t task,
                                             float gk, float gv, int j0, int nkeys, float* Ks,
                                             float* Vs, int ld) {
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* pk = static_cast<const T*>(a.pk);
  const T* pv = static_cast<const T*>(a.pv);
  for (int e = threadIdx.x; e < kTile * a.D; e += blockDim.x) {
    const int r = e / a.D, d = e - r * a.D;
    const int j = j0 + r;
    float kv = 0.f, vv = 0.f;
    if (j < nkeys) {
      kv = kv_elem(a, k, a.sk, pk, a.spk, b, hkv, task, gk, j, d);
      vv = kv_elem(a, v, a.sv, pv, a.spv, b, hkv, task, gv, j, d);
    }
    Ks[r * ld + d] = kv;
    Vs[r * ld + d] = vv;
  }
}

// sum_d a[d] * b[d] over shared-memory rows, four independent chains for latency.
__device__ __forceinline__ float dot_rows(const float* a, const float* b, int D) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int d = 0;
  for (; d + 4 <= D; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < D; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}

// Token keys a block of query rows [.., i_last] can see: causal stops at i_last + Lk - Lq.
__device__ __forceinline__ int key_end(const UfAttnArgs& a, int i_last) {
  int tok_end = a.Lk;
  if (a.causal) {
    const int lim = i_last + (a.Lk - a.Lq) + 1;
    tok_end = lim < 0 ? 0 : (lim < a.Lk ? lim : a.Lk);
  }
  return a.P + tok_end;
}

// ---- forward ---------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(const UfAttnArgs a, T* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int D = a.D, ld = D + 1;
  float* Ks = smem;
  float* Vs = Ks + kTile * ld;
  float* Qs = Vs + kTile * ld;  // kWarps rows of D

  const int nqb = (a.Lq + kWarps - 1) / kWarps;
  const int qb = static_cast<int>(blockIdx.x % nqb);
  const int64_t bh = blockIdx.x / nqb;
  const int b = static_cast<int>(bh / a.H), h = static_cast<int>(bh % a.H);
  const int hkv = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int i = qb * kWarps + warp;
  const bool row_ok = i < a.Lq;
  const int i_last = min(a.Lq - 1, qb * kWarps + kWarps - 1);
  const int64_t task = a.P > 0 ? clamp_task(a, b) : 0;
  const float gk = a.gate != nullptr ? a.gate[2 * b] : 1.f;
  const float gv = a.gate != nullptr ? a.gate[2 * b + 1] : 1.f;
  const float qk2 = a.scale * uf::kLog2e;  // logits in base 2

  const T* q = static_cast<const T*>(a.q);
  const int64_t qoff = b * a.sq[0] + h * a.sq[1] + static_cast<int64_t>(i) * a.sq[2];
  float* qrow = Qs + warp * D;
  for (int d = lane; d < D; d += 32)
    qrow[d] = row_ok ? uf::to_f(q[qoff + static_cast<int64_t>(d) * a.sq[3]]) * qk2 : 0.f;

  const int nkeys = key_end(a, i_last);
  float m = kNegInf, l = 0.f;
  float acc[kDpl];
#pragma unroll
  for (int t = 0; t < kDpl; ++t) acc[t] = 0.f;

  for (int j0 = 0; j0 < nkeys; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and qrow is written)
    load_kv_tile<T>(a, b, hkv, task, gk, gv, j0, nkeys, Ks, Vs, ld);
    __syncthreads();
    if (row_ok) {  // warp-uniform
      const int j = j0 + lane;
      float s = kNegInf;
      if (j < nkeys && key_visible(a, b, i, j))
        s = dot_rows(qrow, Ks + lane * ld, D) + bias2<T>(a, b, h, i, j);
      const float mn = fmaxf(m, uf::warp_max(s));
      if (mn != kNegInf) {  // warp-uniform: some key seen so far
        const float alpha = exp2f(m - mn);  // 0 while m is -inf
        const float p = s == kNegInf ? 0.f : exp2f(s - mn);
        l = l * alpha + uf::warp_sum(p);
#pragma unroll
        for (int t = 0; t < kDpl; ++t) acc[t] *= alpha;
        for (int r = 0; r < kTile; ++r) {
          const float pr = __shfl_sync(uf::kFull, p, r);
          const float* vr = Vs + r * ld;
#pragma unroll
          for (int t = 0; t < kDpl; ++t) {
            const int d = lane + 32 * t;
            if (d < D) acc[t] += pr * vr[d];
          }
        }
        m = mn;
      }
    }
  }

  if (row_ok) {
    const int64_t row = bh * a.Lq + i;
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int t = 0; t < kDpl; ++t) {
      const int d = lane + 32 * t;
      if (d < D) out[row * D + d] = uf::from_f<T>(acc[t] * inv);
    }
    if (lane == 0) lse[row] = l > 0.f ? (m + log2f(l)) * uf::kLn2 : kNegInf;
  }
}

// ---- backward --------------------------------------------------------------------------------

// Delta = rowsum(dO * O), one warp per row (B*H*Lq rows, contiguous (rows, D)).
template <typename T>
__global__ void attn_delta_kernel(const T* __restrict__ go, const T* __restrict__ o,
                                  float* __restrict__ delta, int64_t rows, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t w0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nw = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = w0; r < rows; r += nw) {
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += uf::to_f(go[r * D + d]) * uf::to_f(o[r * D + d]);
    acc = uf::warp_sum(acc);
    if (lane == 0) delta[r] = acc;
  }
}

// dQ: one warp per query row, looping over key tiles like the forward.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_dq_kernel(const UfAttnArgs a, const T* __restrict__ go, const float* __restrict__ lse,
                   const float* __restrict__ delta, T* __restrict__ dq) {
  extern __shared__ float smem[];
  const int D = a.D, ld = D + 1;
  float* Ks = smem;
  float* Vs = Ks + kTile * ld;
  float* Qs = Vs + kTile * ld;    // kWarps rows of D
  float* dOs = Qs + kWarps * D;   // kWarps rows of D

  const int nqb = (a.Lq + kWarps - 1) / kWarps;
  const int qb = static_cast<int>(blockIdx.x % nqb);
  const int64_t bh = blockIdx.x / nqb;
  const int b = static_cast<int>(bh / a.H), h = static_cast<int>(bh % a.H);
  const int hkv = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int i = qb * kWarps + warp;
  const bool row_ok = i < a.Lq;
  const int i_last = min(a.Lq - 1, qb * kWarps + kWarps - 1);
  const int64_t task = a.P > 0 ? clamp_task(a, b) : 0;
  const float gk = a.gate != nullptr ? a.gate[2 * b] : 1.f;
  const float gv = a.gate != nullptr ? a.gate[2 * b + 1] : 1.f;
  const float qk2 = a.scale * uf::kLog2e;
  const int64_t row = bh * a.Lq + i;

  const float lse2 = row_ok ? lse[row] * uf::kLog2e : kNegInf;
  const float dlt = row_ok ? delta[row] : 0.f;
  const bool live = row_ok && lse2 != kNegInf;  // an empty row has zero gradient

  const T* q = static_cast<const T*>(a.q);
  const int64_t qoff = b * a.sq[0] + h * a.sq[1] + static_cast<int64_t>(i) * a.sq[2];
  float* qrow = Qs + warp * D;
  float* grow = dOs + warp * D;
  for (int d = lane; d < D; d += 32) {
    qrow[d] = row_ok ? uf::to_f(q[qoff + static_cast<int64_t>(d) * a.sq[3]]) * qk2 : 0.f;
    grow[d] = row_ok ? uf::to_f(go[row * D + d]) : 0.f;
  }

  const int nkeys = key_end(a, i_last);
  float acc[kDpl];
#pragma unroll
  for (int t = 0; t < kDpl; ++t) acc[t] = 0.f;

  for (int j0 = 0; j0 < nkeys; j0 += kTile) {
    __syncthreads();
    load_kv_tile<T>(a, b, hkv, task, gk, gv, j0, nkeys, Ks, Vs, ld);
    __syncthreads();
    if (live) {  // warp-uniform
      const int j = j0 + lane;
      float ds = 0.f;
      if (j < nkeys && key_visible(a, b, i, j)) {
        const float s = dot_rows(qrow, Ks + lane * ld, D) + bias2<T>(a, b, h, i, j);
        const float dp = dot_rows(grow, Vs + lane * ld, D);
        const float p = exp2f(s - lse2);
        ds = p * (dp - dlt);
      }
      for (int r = 0; r < kTile; ++r) {
        const float dsr = __shfl_sync(uf::kFull, ds, r);
        const float* kr = Ks + r * ld;
#pragma unroll
        for (int t = 0; t < kDpl; ++t) {
          const int d = lane + 32 * t;
          if (d < D) acc[t] += dsr * kr[d];
        }
      }
    }
  }

  if (row_ok) {
#pragma unroll
    for (int t = 0; t < kDpl; ++t) {
      const int d = lane + 32 * t;
      if (d < D) dq[row * D + d] = uf::from_f<T>(acc[t] * a.scale);
    }
  }
}

// dK/dV: one warp per key row j of (b, hkv), looping over the query heads of the group and
// the query tiles. Token keys write dk/dv; prefix keys write per-example float32 partials
// (times the gate) and the gate-gradient terms <dk_eff, pk>, <dv_eff, pv>.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_dkv_kernel(const UfAttnArgs a, const T* __restrict__ go, const float* __restrict__ lse,
                    const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                    float* __restrict__ ppk, float* __restrict__ ppv, float* __restrict__ gpk,
                    float* __restrict__ gpv) {
  extern __shared__ float smem[];
  const int D = a.D, ld = D + 1;
  float* Qs = smem;                  // kTile rows, stride ld
  float* dOs = Qs + kTile * ld;      // kTile rows, stride ld
  float* Kw = dOs + kTile * ld;      // kWarps rows of D
  float* Vw = Kw + kWarps * D;       // kWarps rows of D
  float* lse2s = Vw + kWarps * D;    // kTile
  float* dlts = lse2s + kTile;       // kTile

  const int nk = a.P + a.Lk;
  const int nkb = (nk + kWarps - 1) / kWarps;
  const int kb = static_cast<int>(blockIdx.x % nkb);
  const int64_t bk = blockIdx.x / nkb;
  const int b = static_cast<int>(bk / a.Hkv), hkv = static_cast<int>(bk % a.Hkv);
  const int group = a.H / a.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int j = kb * kWarps + warp;
  const bool key_ok = j < nk;
  const bool is_prefix = j < a.P;
  const int t_tok = j - a.P;
  const bool key_live =
      key_ok && (is_prefix || a.kpm == nullptr || a.kpm[static_cast<int64_t>(b) * a.Lk + t_tok]);
  const int64_t task = a.P > 0 ? clamp_task(a, b) : 0;
  const float gk = a.gate != nullptr ? a.gate[2 * b] : 1.f;
  const float gv = a.gate != nullptr ? a.gate[2 * b + 1] : 1.f;
  const float qk2 = a.scale * uf::kLog2e;

  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* pk = static_cast<const T*>(a.pk);
  const T* pv = static_cast<const T*>(a.pv);
  float* krow = Kw + warp * D;
  float* vrow = Vw + warp * D;
  for (int d = lane; d < D; d += 32) {
    krow[d] = key_ok ? kv_elem(a, k, a.sk, pk, a.spk, b, hkv, task, gk, j, d) : 0.f;
    vrow[d] = key_ok ? kv_elem(a, v, a.sv, pv, a.spv, b, hkv, task, gv, j, d) : 0.f;
  }

  // Causal: token key t is seen by rows i >= t - (Lk - Lq); prefix keys by every row.
  int i_start = 0;
  const int j_first = kb * kWarps;
  if (a.causal && j_first >= a.P) {
    const int lim = (j_first - a.P) - (a.Lk - a.Lq);
    i_start = lim > 0 ? lim : 0;
  }

  float dka[kDpl], dva[kDpl];
#pragma unroll
  for (int t = 0; t < kDpl; ++t) dka[t] = dva[t] = 0.f;

  for (int hh = 0; hh < group; ++hh) {
    const int h = hkv * group + hh;
    const int64_t bh = static_cast<int64_t>(b) * a.H + h;
    for (int i0 = i_start; i0 < a.Lq; i0 += kTile) {
      __syncthreads();  // the previous tile is consumed (and krow/vrow are written)
      for (int e = threadIdx.x; e < kTile * D; e += blockDim.x) {
        const int r = e / D, d = e - r * D;
        const int i = i0 + r;
        float qv = 0.f, gvv = 0.f;
        if (i < a.Lq) {
          qv = uf::to_f(q[b * a.sq[0] + h * a.sq[1] + static_cast<int64_t>(i) * a.sq[2] +
                          static_cast<int64_t>(d) * a.sq[3]]);
          gvv = uf::to_f(go[(bh * a.Lq + i) * D + d]);
        }
        Qs[r * ld + d] = qv;
        dOs[r * ld + d] = gvv;
      }
      if (threadIdx.x < kTile) {
        const int i = i0 + threadIdx.x;
        lse2s[threadIdx.x] = i < a.Lq ? lse[bh * a.Lq + i] * uf::kLog2e : kNegInf;
        dlts[threadIdx.x] = i < a.Lq ? delta[bh * a.Lq + i] : 0.f;
      }
      __syncthreads();
      if (key_live) {  // warp-uniform
        const int i = i0 + lane;
        float p = 0.f, ds = 0.f;
        const bool vis = is_prefix || !a.causal || t_tok <= i + (a.Lk - a.Lq);
        if (i < a.Lq && lse2s[lane] != kNegInf && vis) {
          const float s = dot_rows(Qs + lane * ld, krow, D);
          const float dp = dot_rows(dOs + lane * ld, vrow, D);
          p = exp2f(s * qk2 + bias2<T>(a, b, h, i, j) - lse2s[lane]);
          ds = p * (dp - dlts[lane]);
        }
        for (int r = 0; r < kTile; ++r) {
          const float pr = __shfl_sync(uf::kFull, p, r);
          const float dsr = __shfl_sync(uf::kFull, ds, r);
          const float* qr = Qs + r * ld;
          const float* gr = dOs + r * ld;
#pragma unroll
          for (int t = 0; t < kDpl; ++t) {
            const int d = lane + 32 * t;
            if (d < D) {
              dva[t] += pr * gr[d];
              dka[t] += dsr * qr[d];
            }
          }
        }
      }
    }
  }

  if (!key_ok) return;  // no block-wide sync below
  if (!is_prefix) {
    const int64_t off = ((static_cast<int64_t>(b) * a.Hkv + hkv) * a.Lk + t_tok) * D;
#pragma unroll
    for (int t = 0; t < kDpl; ++t) {
      const int d = lane + 32 * t;
      if (d < D) {
        dk[off + d] = uf::from_f<T>(dka[t] * a.scale);
        dv[off + d] = uf::from_f<T>(dva[t]);
      }
    }
    return;
  }
  const int64_t prow = (static_cast<int64_t>(b) * a.Hkv + hkv) * a.P + j;
  float gdk = 0.f, gdv = 0.f;
#pragma unroll
  for (int t = 0; t < kDpl; ++t) {
    const int d = lane + 32 * t;
    if (d < D) {
      const float dke = dka[t] * a.scale;  // gradient of the gated key g_k * pk
      ppk[prow * D + d] = gk * dke;
      ppv[prow * D + d] = gv * dva[t];
      if (gpk != nullptr) {  // d gate = <d gated row, raw row>: read the raw row again
        const int64_t po = task * a.spk[0] + hkv * a.spk[1] + static_cast<int64_t>(j) * a.spk[2];
        const int64_t vo = task * a.spv[0] + hkv * a.spv[1] + static_cast<int64_t>(j) * a.spv[2];
        gdk += dke * uf::to_f(pk[po + static_cast<int64_t>(d) * a.spk[3]]);
        gdv += dva[t] * uf::to_f(pv[vo + static_cast<int64_t>(d) * a.spv[3]]);
      }
    }
  }
  if (gpk != nullptr) {
    gdk = uf::warp_sum(gdk);
    gdv = uf::warp_sum(gdv);
    if (lane == 0) {
      gpk[prow] = gdk;
      gpv[prow] = gdv;
    }
  }
}

// Group the examples by task, keeping example order: offsets (T + 1), order (B). One thread:
// O(T + B) work, tiny next to the attention.
__global__ void task_order_kernel(const UfAttnArgs a, int* __restrict__ offsets,
                                  int* __restrict__ order, int* __restrict__ pos) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  for (int t = 0; t <= a.T; ++t) offsets[t] = 0;
  for (int b = 0; b < a.B; ++b) offsets[clamp_task(a, b) + 1] += 1;
  for (int t = 0; t < a.T; ++t) offsets[t + 1] += offsets[t];
  for (int t = 0; t < a.T; ++t) pos[t] = offsets[t];
  for (int b = 0; b < a.B; ++b) order[pos[clamp_task(a, b)]++] = b;
}

// dprefix[t, e] = sum of the partials of task t's examples, in example order.
template <typename T>
__global__ void prefix_reduce_kernel(const float* __restrict__ part, const int* __restrict__ offsets,
                                     const int* __restrict__ order, T* __restrict__ dst, int64_t E,
                                     int64_t n) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / E, e = idx - t * E;
    float acc = 0.f;
    for (int o = offsets[t]; o < offsets[t + 1]; ++o) acc += part[order[o] * E + e];
    dst[idx] = uf::from_f<T>(acc);
  }
}

// dgate[b, c] = sum over (hkv, j) of the gate terms, in order.
__global__ void gate_reduce_kernel(const float* __restrict__ gpk, const float* __restrict__ gpv,
                                   float* __restrict__ dgate, int B, int64_t n) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= 2 * B) return;
  const int b = idx >> 1, c = idx & 1;
  const float* src = (c == 0 ? gpk : gpv) + static_cast<int64_t>(b) * n;
  float acc = 0.f;
  for (int64_t e = 0; e < n; ++e) acc += src[e];
  dgate[idx] = acc;
}

size_t fwd_smem(int D) { return sizeof(float) * (2 * kTile * (D + 1) + kWarps * D); }
size_t bwd_smem(int D) { return sizeof(float) * (2 * kTile * (D + 1) + 2 * kWarps * D + 2 * kTile); }

// Above 48 KiB a kernel must opt in to dynamic shared memory.
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

bool args_ok(const UfAttnArgs& a) {
  return a.D >= 1 && a.D <= UF_MAX_HEAD_DIM && a.Hkv >= 1 && a.H % a.Hkv == 0 && a.B >= 0 &&
         a.Lq >= 0 && a.Lk >= 0 && a.P >= 0 && (a.P == 0 || a.T >= 1);
}

}  // namespace

int64_t uf_prefix_attention_workspace_floats(const UfAttnArgs& a) {
  const int64_t rows = static_cast<int64_t>(a.B) * a.H * a.Lq;
  const int64_t pe = static_cast<int64_t>(a.B) * a.Hkv * a.P;
  return rows + 2 * pe * a.D + 2 * pe;
}

int64_t uf_prefix_attention_workspace_ints(const UfAttnArgs& a) {
  return 2 * static_cast<int64_t>(a.T) + 1 + a.B;
}

cudaError_t uf_prefix_attention_forward(const UfAttnArgs& a, int dtype, void* out, float* lse,
                                        cudaStream_t stream) {
  if (!args_ok(a)) return cudaErrorInvalidValue;
  const int64_t nblocks = static_cast<int64_t>((a.Lq + kWarps - 1) / kWarps) * a.B * a.H;
  if (nblocks == 0) return cudaSuccess;
  if (nblocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = fwd_smem(a.D);
  UF_DISPATCH(dtype, {
    cudaError_t err = allow_smem(attn_fwd_kernel<scalar_t>, smem);
    if (err != cudaSuccess) return err;
    attn_fwd_kernel<scalar_t><<<static_cast<unsigned>(nblocks), kThreads, smem, stream>>>(
        a, static_cast<scalar_t*>(out), lse);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_prefix_attention_backward(const UfAttnArgs& a, int dtype, const void* grad_out,
                                         const void* out, const float* lse, void* dq, void* dk,
                                         void* dv, void* dpk, void* dpv, float* dgate,
                                         float* workspace, int* iworkspace,
                                         cudaStream_t stream) {
  if (!args_ok(a)) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(a.B) * a.H * a.Lq;
  const int64_t pe = static_cast<int64_t>(a.B) * a.Hkv * a.P;  // prefix rows over examples
  float* delta = workspace;
  float* ppk = delta + rows;
  float* ppv = ppk + pe * a.D;
  float* gpk = ppv + pe * a.D;
  float* gpv = gpk + pe;
  int* offsets = iworkspace;
  int* order = offsets + a.T + 1;
  int* pos = order + a.B;
  const int64_t nqblocks = static_cast<int64_t>((a.Lq + kWarps - 1) / kWarps) * a.B * a.H;
  const int64_t nkblocks =
      static_cast<int64_t>((a.P + a.Lk + kWarps - 1) / kWarps) * a.B * a.Hkv;
  if (nqblocks > 0x7fffffffLL || nkblocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = bwd_smem(a.D);
  const bool gated = dgate != nullptr;
  UF_DISPATCH(dtype, {
    const scalar_t* go = static_cast<const scalar_t*>(grad_out);
    if (rows > 0) {
      attn_delta_kernel<scalar_t><<<uf::grid_1d(rows * 32, 256), 256, 0, stream>>>(
          go, static_cast<const scalar_t*>(out), delta, rows, a.D);
      UF_CHECK_LAUNCH();
    }
    if (nqblocks > 0) {
      cudaError_t err = allow_smem(attn_dq_kernel<scalar_t>, smem);
      if (err != cudaSuccess) return err;
      attn_dq_kernel<scalar_t><<<static_cast<unsigned>(nqblocks), kThreads, smem, stream>>>(
          a, go, lse, delta, static_cast<scalar_t*>(dq));
      UF_CHECK_LAUNCH();
    }
    if (nkblocks > 0) {
      cudaError_t err = allow_smem(attn_dkv_kernel<scalar_t>, smem);
      if (err != cudaSuccess) return err;
      attn_dkv_kernel<scalar_t><<<static_cast<unsigned>(nkblocks), kThreads, smem, stream>>>(
          a, go, lse, delta, static_cast<scalar_t*>(dk), static_cast<scalar_t*>(dv), ppk, ppv,
          gated ? gpk : nullptr, gated ? gpv : nullptr);
      UF_CHECK_LAUNCH();
    }
    const int64_t E = static_cast<int64_t>(a.Hkv) * a.P * a.D;
    const int64_t n = E * a.T;
    if (n > 0) {
      task_order_kernel<<<1, 32, 0, stream>>>(a, offsets, order, pos);
      UF_CHECK_LAUNCH();
      prefix_reduce_kernel<scalar_t><<<uf::grid_1d(n, 256), 256, 0, stream>>>(
          ppk, offsets, order, static_cast<scalar_t*>(dpk), E, n);
      UF_CHECK_LAUNCH();
      prefix_reduce_kernel<scalar_t><<<uf::grid_1d(n, 256), 256, 0, stream>>>(
          ppv, offsets, order, static_cast<scalar_t*>(dpv), E, n);
      UF_CHECK_LAUNCH();
    }
    if (gated && a.B > 0) {
      gate_reduce_kernel<<<static_cast<unsigned>(uf::ceil_div(2 * a.B, 256)), 256, 0, stream>>>(
          gpk, gpv, dgate, a.B, static_cast<int64_t>(a.Hkv) * a.P);
      UF_CHECK_LAUNCH();
    }
  });
  return cudaSuccess;
}
