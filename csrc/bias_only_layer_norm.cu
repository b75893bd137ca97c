// bias_only_layer_norm (BitFit LayerNorm: gamma frozen, beta trained). One block per row;
// float32 statistics with a two-pass variance. The backward never computes d gamma; d beta
// is the deterministic column sum of grad_y (uf_colsum, bias_only_linear.cu).
#include "common.cuh"

namespace {

int row_threads(int64_t N) { return N >= 1024 ? 256 : 128; }

template <typename T>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, int64_t sxm, int64_t sxn,
                                      const T* __restrict__ w, const T* __restrict__ b,
                                      T* __restrict__ y, float* __restrict__ mean_out,
                                      float* __restrict__ rstd_out, int64_t N, float eps) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * sxm;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) s += uf::to_f(xr[c * sxn]);
  const float mean = uf::block_sum(s, shm) / static_cast<float>(N);
  float s2 = 0.f;
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    const float d = uf::to_f(xr[c * sxn]) - mean;
    s2 += d * d;
  }
  const float var = uf::block_sum(s2, shm) / static_cast<float>(N);
  const float rstd = 1.f / sqrtf(var + eps);
  T* yr = y + row * N;
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    const float xh = (uf::to_f(xr[c * sxn]) - mean) * rstd;
    yr[c] = uf::from_f<T>(xh * uf::to_f(w[c]) + uf::to_f(b[c]));
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)), xhat = (x - mean) * rstd.
template <typename T>
__global__ void layer_norm_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                                      int64_t sxm, int64_t sxn, const T* __restrict__ w,
                                      const float* __restrict__ mean_in,
                                      const float* __restrict__ rstd_in, T* __restrict__ dx,
                                      int64_t N) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * sxm;
  const T* gr = gy + row * N;
  const float mean = mean_in[row], rstd = rstd_in[row];
  float a = 0.f, bsum = 0.f;
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    const float wg = uf::to_f(gr[c]) * uf::to_f(w[c]);
    a += wg;
    bsum += wg * (uf::to_f(xr[c * sxn]) - mean) * rstd;
  }
  const float inv_n = 1.f / static_cast<float>(N);
  const float mean_wg = uf::block_sum(a, shm) * inv_n;
  const float mean_wgx = uf::block_sum(bsum, shm) * inv_n;
  T* dr = dx + row * N;
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    const float wg = uf::to_f(gr[c]) * uf::to_f(w[c]);
    const float xh = (uf::to_f(xr[c * sxn]) - mean) * rstd;
    dr[c] = uf::from_f<T>(rstd * (wg - mean_wg - xh * mean_wgx));
  }
}

}  // namespace

cudaError_t uf_layer_norm_forward(const void* x, int64_t sxm, int64_t sxn, const void* weight,
                                  const void* bias, void* y, float* mean, float* rstd, int64_t M,
                                  int64_t N, float eps, int dtype, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > 0x7fffffffLL) return cudaErrorInvalidValue;
  UF_DISPATCH(dtype, {
    layer_norm_fwd_kernel<scalar_t>
        <<<static_cast<unsigned>(M), row_threads(N), 0, stream>>>(
            static_cast<const scalar_t*>(x), sxm, sxn, static_cast<const scalar_t*>(weight),
            static_cast<const scalar_t*>(bias), static_cast<scalar_t*>(y), mean, rstd, N, eps);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_layer_norm_backward(const void* grad_y, const void* x, int64_t sxm, int64_t sxn,
                                   const void* weight, const float* mean, const float* rstd,
                                   void* dx, void* dbias, float* partials, int64_t M, int64_t N,
                                   int dtype, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (M > 0x7fffffffLL) return cudaErrorInvalidValue;
  UF_DISPATCH(dtype, {
    if (M > 0) {
      layer_norm_bwd_kernel<scalar_t>
          <<<static_cast<unsigned>(M), row_threads(N), 0, stream>>>(
              static_cast<const scalar_t*>(grad_y), static_cast<const scalar_t*>(x), sxm, sxn,
              static_cast<const scalar_t*>(weight), mean, rstd, static_cast<scalar_t*>(dx), N);
      UF_CHECK_LAUNCH();
    }
  });
  return uf_colsum(grad_y, 0, dtype, M, N, N, partials, dbias, 0, stream);
}
