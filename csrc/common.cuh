// Device helpers shared by the .cu files: dtype conversion, activations, warp/block sums,
// launch checks. Torch-free (see launchers.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "launchers.h"

namespace uf {

constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// act(x) for the ids of UfAct. Full-precision libm calls: no fast-math, fp32 must meet 2e-4.
__device__ __forceinline__ float act_fwd(float x, int act) {
  switch (act) {
    case UF_RELU:
      return x > 0.f ? x : 0.f;
    case UF_GELU:
      return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case UF_GELU_TANH: {
      const float k = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
    case UF_SILU:
      return x / (1.f + expf(-x));
    case UF_TANH:
      return tanhf(x);
    default:
      return x;
  }
}

// act'(x). For relu, x may be the output y instead of the pre-activation (same sign test).
__device__ __forceinline__ float act_grad(float x, int act) {
  switch (act) {
    case UF_RELU:
      return x > 0.f ? 1.f : 0.f;
    case UF_GELU: {
      const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
      const float pdf = 0.3989422804014327f * expf(-0.5f * x * x);  // 1 / sqrt(2 pi)
      return cdf + x * pdf;
    }
    case UF_GELU_TANH: {
      const float k = 0.7978845608028654f;
      const float t = tanhf(k * (x + 0.044715f * x * x * x));
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * x * x);
    }
    case UF_SILU: {
      const float sg = 1.f / (1.f + expf(-x));
      return sg * (1.f + x * (1.f - sg));
    }
    case UF_TANH: {
      const float t = tanhf(x);
      return 1.f - t * t;
    }
    default:
      return 1.f;
  }
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// The order is fixed by the thread layout, so the result is deterministic. `shm` holds 32
// floats; the call synchronises, so `shm` may be reused right after it returns.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // shm may still be read by a previous call
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  float t = lane < nw ? shm[lane] : 0.f;
  return warp_sum(t);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride elementwise loop over n items with `threads` per block.
inline unsigned grid_1d(int64_t n, int threads) {
  int64_t g = ceil_div(n, threads);
  if (g > 65536) g = 65536;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace uf

// Run `body` with `scalar_t` bound to the element type of the dtype tag; unknown tags give
// cudaErrorInvalidValue. Three instantiations per kernel keep compile time low.
#define UF_DISPATCH(dtype, ...)                     \
  do {                                              \
    switch (dtype) {                                \
      case UF_F32: {                                \
        typedef float scalar_t;                     \
        __VA_ARGS__;                                \
        break;                                      \
      }                                             \
      case UF_F16: {                                \
        typedef __half scalar_t;                    \
        __VA_ARGS__;                                \
        break;                                      \
      }                                             \
      case UF_BF16: {                               \
        typedef __nv_bfloat16 scalar_t;             \
        __VA_ARGS__;                                \
        break;                                      \
      }                                             \
      default:                                      \
        return cudaErrorInvalidValue;               \
    }                                               \
  } while (0)

#define UF_CHECK_LAUNCH()                       \
  do {                                          \
    cudaError_t uf_err_ = cudaGetLastError();   \
    if (uf_err_ != cudaSuccess) return uf_err_; \
  } while (0)
