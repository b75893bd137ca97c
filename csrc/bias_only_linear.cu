// bias_only_linear (BitFit): the GEMMs run in cuBLAS (called by the binding); this file
// holds the fused epilogues around them, and the deterministic column sums that the other
// ops reuse for their bias gradients.
//   forward:  y = act(mm + bias), pre = mm + bias (kept for act' when act is not relu)
//   backward: dpre = grad_y * act'(saved), dbias = sum_rows dpre (two fixed-order stages)
#include "common.cuh"

namespace {

constexpr int kColThreads = 256;

// Rows per column-sum chunk: at least 64, and at most 4096 chunks (grid.y stays small).
int64_t chunk_rows(int64_t M) {
  int64_t r = uf::ceil_div(M, 4096);
  return r < 64 ? 64 : r;
}

// partials[chunk, col] = sum of src[row, col] over the chunk's rows, in row order.
template <typename T>
__global__ void colsum_partial_kernel(const T* __restrict__ src, int64_t M, int64_t N,
                                      int64_t ld, int64_t rows, float* __restrict__ partials) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= N) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows;
  const int64_t r1 = r0 + rows < M ? r0 + rows : M;
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) acc += uf::to_f(src[r * ld + col]);
  partials[static_cast<int64_t>(blockIdx.y) * N + col] = acc;
}

// out[col] = sum over chunks in order (0 when there is none).
template <typename T>
__global__ void colsum_final_kernel(const float* __restrict__ partials, int64_t nchunks,
                                    int64_t N, void* __restrict__ out, int out_f32) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= N) return;
  float acc = 0.f;
  for (int64_t c = 0; c < nchunks; ++c) acc += partials[c * N + col];
  if (out_f32)
    static_cast<float*>(out)[col] = acc;
  else
    static_cast<T*>(out)[col] = uf::from_f<T>(acc);
}

template <typename T>
__global__ void linear_epilogue_kernel(const T* __restrict__ mm, const T* __restrict__ bias,
                                       T* __restrict__ y, T* __restrict__ pre, int64_t M,
                                       int64_t N, int act) {
  const int64_t n = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = uf::to_f(mm[i]) + uf::to_f(bias[i % N]);
    if (pre != nullptr) pre[i] = uf::from_f<T>(v);
    y[i] = uf::from_f<T>(uf::act_fwd(v, act));
  }
}

// One thread per column over a chunk of rows: dpre = grad_y * act'(saved), written when
// dpre != nullptr, and the chunk's column sum of dpre (in float32, before rounding).
template <typename T>
__global__ void linear_backward_kernel(const T* __restrict__ gy, const T* __restrict__ saved,
                                       T* __restrict__ dpre, int64_t M, int64_t N, int64_t rows,
                                       int act, float* __restrict__ partials) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= N) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows;
  const int64_t r1 = r0 + rows < M ? r0 + rows : M;
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r * N + col;
    float g = uf::to_f(gy[i]);
    if (act != UF_IDENTITY) g *= uf::act_grad(uf::to_f(saved[i]), act);
    if (dpre != nullptr) dpre[i] = uf::from_f<T>(g);
    acc += g;
  }
  partials[static_cast<int64_t>(blockIdx.y) * N + col] = acc;
}

}  // namespace

int uf_colsum_chunks(int64_t M) { return static_cast<int>(uf::ceil_div(M, chunk_rows(M))); }

cudaError_t uf_colsum(const void* src, int src_f32, int dtype, int64_t M, int64_t N, int64_t ld,
                      float* partials, void* out, int out_f32, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  const int64_t rows = chunk_rows(M);
  const int64_t nchunks = uf_colsum_chunks(M);
  const unsigned gx = static_cast<unsigned>(uf::ceil_div(N, kColThreads));
  UF_DISPATCH(dtype, {
    if (nchunks > 0) {
      const dim3 grid(gx, static_cast<unsigned>(nchunks));
      if (src_f32)
        colsum_partial_kernel<float><<<grid, kColThreads, 0, stream>>>(
            static_cast<const float*>(src), M, N, ld, rows, partials);
      else
        colsum_partial_kernel<scalar_t><<<grid, kColThreads, 0, stream>>>(
            static_cast<const scalar_t*>(src), M, N, ld, rows, partials);
      UF_CHECK_LAUNCH();
    }
    colsum_final_kernel<scalar_t><<<gx, kColThreads, 0, stream>>>(partials, nchunks, N, out,
                                                                  out_f32);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_linear_epilogue(const void* mm, const void* bias, void* y, void* pre, int64_t M,
                               int64_t N, int act, int dtype, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  UF_DISPATCH(dtype, {
    linear_epilogue_kernel<scalar_t><<<uf::grid_1d(M * N, 256), 256, 0, stream>>>(
        static_cast<const scalar_t*>(mm), static_cast<const scalar_t*>(bias),
        static_cast<scalar_t*>(y), static_cast<scalar_t*>(pre), M, N, act);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t uf_linear_backward(const void* grad_y, const void* saved, void* dpre, void* dbias,
                               float* partials, int64_t M, int64_t N, int act, int dtype,
                               cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  const int64_t rows = chunk_rows(M);
  const int64_t nchunks = uf_colsum_chunks(M);
  const unsigned gx = static_cast<unsigned>(uf::ceil_div(N, kColThreads));
  UF_DISPATCH(dtype, {
    if (nchunks > 0) {
      linear_backward_kernel<scalar_t>
          <<<dim3(gx, static_cast<unsigned>(nchunks)), kColThreads, 0, stream>>>(
              static_cast<const scalar_t*>(grad_y), static_cast<const scalar_t*>(saved),
              static_cast<scalar_t*>(dpre), M, N, rows, act, partials);
      UF_CHECK_LAUNCH();
    }
    colsum_final_kernel<scalar_t><<<gx, kColThreads, 0, stream>>>(partials, nchunks, N, dbias,
                                                                  0);
    UF_CHECK_LAUNCH();
  });
  return cudaSuccess;
}
