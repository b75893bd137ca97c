// gated_adapter: out = res + g * scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up).
// The binding runs the GEMMs in cuBLAS, with w_gate appended to w_down as one more output
// column so the gate logits come out of the same GEMM. This file holds the epilogues, the
// gate (per token, or a masked mean over each example) and the backward's elementwise and
// per-row passes. Weight gradients are GEMMs (deterministic); bias gradients use the
// two-stage column sums of bias_only_linear.cu.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

int row_threads(int64_t d) { return d >= 1024 ? 256 : 128; }

// mm (M, R1) float32 -> z = mm[:, :r] + b_down (float32), h = act(z) (T), s = mm[:, r] +
// b_gate. mm is float32 even for half inputs: z and s feed the gate gradient, a per-token
// dot product prone to cancellation, so they must not be rounded to half precision.
template <typename T>
__global__ void down_epilogue_kernel(const float* __restrict__ mm, const T* __restrict__ b_down,
                                     const T* __restrict__ b_gate, float* __restrict__ z,
                                     T* __restrict__ h, float* __restrict__ s, int64_t M, int r,
                                     int R1, int act) {
  const int64_t n = M * R1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / R1;
    const int j = static_cast<int>(i - m * R1);
    float v = mm[i];
    if (j < r) {
      if (b_down != nullptr) v += uf::to_f(b_down[j]);
      z[m * r + j] = v;
      h[m * r + j] = uf::from_f<T>(uf::act_fwd(v, act));
    } else {
      if (b_gate != nullptr) v += uf::to_f(b_gate[0]);
      s[m] = v;
    }
  }
}

// mode 0: g = 1; mode 1: g = sigmoid(s), per row.
__global__ void gate_rowwise_kernel(const float* __restrict__ s, float* __restrict__ g,
                                    int64_t M, int mode) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    g[i] = mode == 0 ? 1.f : uf::sigmoidf_(s[i]);
}

// mode 2, one block per example: g_b = sum_l mask_l sigmoid(s_l) / max(count, 1).
__global__ void gate_mean_kernel(const float* __restrict__ s, const bool* __restrict__ mask,
                                 float* __restrict__ g, int64_t L) {
  __shared__ float shm[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * L;
  float acc = 0.f, cnt = 0.f;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const bool on = mask == nullptr || mask[base + l];
    // Skip, not multiply by 0: a NaN in an excluded token must not reach the mean.
    if (on) acc += uf::sigmoidf_(s[base + l]);
    cnt += on ? 1.f : 0.f;
  }
  acc = uf::block_sum(acc, shm);
  cnt = uf::block_sum(cnt, shm);
  const float gb = acc / fmaxf(cnt, 1.f);
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) g[base + l] = gb;
}

template <typename T>
__global__ void out_epilogue_kernel(const T* __restrict__ u, const T* __restrict__ b_up,
                                    const T* __restrict__ res, int64_t s0, int64_t s1,
                                    int64_t s2, const float* __restrict__ g, T* __restrict__ out,
                                    int64_t L, int64_t d, int64_t n, float scaling) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / d, c = i - m * d;
    const int64_t b = m / L, l = m - b * L;
    float a = uf::to_f(u[i]);
    if (b_up != nullptr) a += uf::to_f(b_up[c]);
    const float rv = uf::to_f(res[b * s0 + l * s1 + c * s2]);
    out[i] = uf::from_f<T>(rv + g[m] * (scaling * a));
  }
}

// One block per row: da = grad_out * g * scaling; with u, dg = scaling * <grad_out, u + b_up>.
// u is float32: the gate gradient is one dot product per row, often with cancellation, so it
// must not see a rounded u.
template <typename T>
__global__ void bwd_up_kernel(const T* __restrict__ go, const float* __restrict__ g,
                              const float* __restrict__ u, const T* __restrict__ b_up,
                              T* __restrict__ da, float* __restrict__ dg, int64_t d,
                              float scaling) {
  __shared__ float shm[32];
  const int64_t m = blockIdx.x;
  const float gs = g[m] * scaling;
  float acc = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float gv = uf::to_f(go[m * d + c]);
    da[m * d + c] = uf::from_f<T>(gv * gs);
    if (u != nullptr) {
      float a = u[m * d + c];
      if (b_up != nullptr) a += uf::to_f(b_up[c]);
      acc += gv * a;
    }
  }
  if (u != nullptr) {  // uniform over the block: every thread reaches block_sum
    acc = uf::block_sum(acc, shm);
    if (threadIdx.x == 0) dg[m] = scaling * acc;
  }
}

// token: ds = dg * sigmoid'(s).
__global__ void gate_token_bwd_kernel(const float* __restrict__ s, const float* __restrict__ dg,
                                      float* __restrict__ ds, int64_t M) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float sg = uf::sigmoidf_(s[i]);
    ds[i] = dg[i] * sg * (1.f - sg);
  }
}

// mean, one block per example: ds_l = (sum_l' dg_l') * mask_l * sigmoid'(s_l) / max(count, 1).
__global__ void gate_mean_bwd_kernel(const float* __restrict__ s, const bool* __restrict__ mask,
                                     const float* __restrict__ dg, float* __restrict__ ds,
                                     int64_t L) {
  __shared__ float shm[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * L;
  float acc = 0.f, cnt = 0.f;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    acc += dg[base + l];
    cnt += mask == nullptr ? 1.f : (mask[base + l] ? 1.f : 0.f);
  }
  acc = uf::block_sum(acc, shm);
  cnt = uf::block_sum(cnt, shm);
  const float k = acc / fmaxf(cnt, 1.f);
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const bool on = mask == nullptr || mask[base + l];
    const float sg = uf::sigmoidf_(s[base + l]);
    ds[base + l] = on ? k * sg * (1.f - sg) : 0.f;
  }
}

// dzc = [dh * act'(z), ds] as float32 (for the bias sums) and T (for the GEMMs).
template <typename T>
__global__ void bwd_down_kernel(const T* __restrict__ dh, const float* __restrict__ z,
                                const float* __restrict__ ds, float* __restrict__ dzc,
                                T* __restrict__ dzc_x, int64_t M, int r, int R1, int act) {
  const int64_t n = M * R1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / R1;
    const int j = static_cast<int>(i - m * R1);
    float v;
    if (j < r)
      v = uf::to_f(dh[m * r + j]) * uf::act_grad(z[m * r + j], act);
    else
      v = ds[m];
    dzc[i] = v;
    dzc_x[i] = uf::from_f<T>(v);
  }
}

template <typename T>
__global__ void act_kernel(const float* __restrict__ z, T* __restrict__ h, int64_t n, int act) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    h[i] = uf::from_f<T>(uf::act_fwd(z[i], act));
}

}  // namespace

cudaError_t uf_adapter_down_epilogue(const float* mm, const void* b_down, const void* b_gate,
                                     float* z, void* h, float* s, int64_t M, int r, int gated,
                                     int act, int dtype, cudaStream_t stream) {
  const int R1 = r + (gated ? 1 : 0);
  if (M <= 0 || R1 <= 0) return cudaSuccess;
  UF_DISPATCH(dtype, {
    down_epilogue_kernel<scalar_t><<<uf::grid_1d(M * R1, kThreads), kThreads, 0, stream>>>(
        mm, static_cast<const scalar_t*>(b_down), static_cast<const scalar_t*>(b_gate), z,
        static_cast<scalar_t*>(h), s, M, r, R1, act);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_adapter_gate(const float* s, const bool* mask, float* g, int64_t B, int64_t L,
                            int mode, cudaStream_t stream) {
  const int64_t M = B * L;
  if (M <= 0) return cudaSuccess;
  if (mode == 2) {
    if (B > 0x7fffffffLL) return cudaErrorInvalidValue;
    gate_mean_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(s, mask, g, L);
  } else {
    gate_rowwise_kernel<<<uf::grid_1d(M, kThreads), kThreads, 0, stream>>>(s, g, M, mode);
  }
  UF_CHECK_LAUNCH();
  return cudaSuccess;
}

cudaError_t uf_adapter_out_epilogue(const void* u, const void* b_up, const void* res,
                                    const int64_t sres[3], const float* g, void* out, int64_t B,
                                    int64_t L, int64_t d, float scaling, int dtype,
                                    cudaStream_t stream) {
  const int64_t n = B * L * d;
  if (n <= 0) return cudaSuccess;
  UF_DISPATCH(dtype, {
    out_epilogue_kernel<scalar_t><<<uf::grid_1d(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(u), static_cast<const scalar_t*>(b_up),
        static_cast<const scalar_t*>(res), sres[0], sres[1], sres[2], g,
        static_cast<scalar_t*>(out), L, d, n, scaling);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_adapter_bwd_up(const void* grad_out, const float* g, const float* u,
                              const void* b_up, void* da, float* dg, int64_t M, int64_t d,
                              float scaling, int dtype, cudaStream_t stream) {
  if (M <= 0 || d <= 0) return cudaSuccess;
  if (M > 0x7fffffffLL) return cudaErrorInvalidValue;
  UF_DISPATCH(dtype, {
    bwd_up_kernel<scalar_t><<<static_cast<unsigned>(M), row_threads(d), 0, stream>>>(
        static_cast<const scalar_t*>(grad_out), g, u,
        static_cast<const scalar_t*>(b_up), static_cast<scalar_t*>(da), dg, d, scaling);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_adapter_gate_backward(const float* s, const bool* mask, const float* dg,
                                     float* ds, int64_t B, int64_t L, int mode,
                                     cudaStream_t stream) {
  const int64_t M = B * L;
  if (M <= 0 || mode == 0) return cudaSuccess;
  if (mode == 2) {
    if (B > 0x7fffffffLL) return cudaErrorInvalidValue;
    gate_mean_bwd_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(s, mask, dg, ds, L);
  } else {
    gate_token_bwd_kernel<<<uf::grid_1d(M, kThreads), kThreads, 0, stream>>>(s, dg, ds, M);
  }
  UF_CHECK_LAUNCH();
  return cudaSuccess;
}

cudaError_t uf_adapter_bwd_down(const void* dh, const float* z, const float* ds, float* dzc,
                                void* dzc_x, int64_t M, int r, int gated, int act, int dtype,
                                cudaStream_t stream) {
  const int R1 = r + (gated ? 1 : 0);
  if (M <= 0 || R1 <= 0) return cudaSuccess;
  UF_DISPATCH(dtype, {
    bwd_down_kernel<scalar_t><<<uf::grid_1d(M * R1, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(dh), z, ds, dzc, static_cast<scalar_t*>(dzc_x), M, r, R1,
        act);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_adapter_act(const float* z, void* h, int64_t n, int act, int dtype,
                           cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  UF_DISPATCH(dtype, {
    act_kernel<scalar_t><<<uf::grid_1d(n, kThreads), kThreads, 0, stream>>>(
        z, static_cast<scalar_t*>(h), n, act);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}
