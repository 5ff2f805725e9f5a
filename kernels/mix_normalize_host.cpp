// Host (CPU) entry points of the fused kernel: the very per-pixel code the GPU runs (dm_mix_pixel
// in mix_normalize.cu), looped over samples, rows and pixels in memory order. Compiled with the C++
// compiler at run time by dalimix.ops.host (never by nvcc or NVRTC); each call handles samples
// [s_begin, s_end), so callers spread a batch over threads.
#include <math.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// the CUDA entry points in mix_normalize.cu refer to these; the host loops below do not use them
struct dm_host_dim3 { unsigned int x, y, z; };
static thread_local dm_host_dim3 blockIdx, threadIdx, blockDim, gridDim;

#include "mix_normalize.cu"

template <class O, bool NHWC>
static void dm_host_mix_normalize(const unsigned char* __restrict__ src, const DmRecord* __restrict__ rec,
                                  const float* __restrict__ masks, typename O::T* __restrict__ dst, int h, int w,
                                  float m0, float m1, float m2, float s0, float s1, float s2, int s_begin,
                                  int s_end) {
  const dm_i64 plane = (dm_i64)h * w;
  for (int s = s_begin; s < s_end; ++s) {
    const DmRecord R = rec[s];
    if (R.method == DM_METHOD_NONE || R.method == DM_METHOD_BLEND) {
      // the common cases as straight loops the compiler vectorises: out = (b + lam * (a - b) - m) * s
      const float lam = R.method == DM_METHOD_NONE ? 1.f : R.lam;
      const unsigned char* a = src + (dm_i64)s * plane * 3;
      const unsigned char* b = src + (dm_i64)(R.method == DM_METHOD_NONE ? s : R.partner) * plane * 3;
      for (dm_i64 r = 0; r < plane; ++r) {
        float v0 = a[3 * r], v1 = a[3 * r + 1], v2 = a[3 * r + 2];
        if (lam != 1.f) {
          const float b0 = b[3 * r], b1 = b[3 * r + 1], b2 = b[3 * r + 2];
          v0 = b0 + lam * (v0 - b0);
          v1 = b1 + lam * (v1 - b1);
          v2 = b2 + lam * (v2 - b2);
        }
        dm_store<O, NHWC>(dst, s, r, plane, v0, v1, v2, m0, m1, m2, s0, s1, s2);
      }
      continue;
    }
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x)
        dm_mix_pixel<O, NHWC>(src, R, masks, dst, s, y, x, h, w, plane, m0, m1, m2, s0, s1, s2);
  }
}

#define DM_HOST_ENTRY(NAME, OUT, NHWC)                                                                  \
  extern "C" void NAME(const unsigned char* src, const DmRecord* rec, const float* masks, OUT::T* dst, \
                       int n, int h, int w, float m0, float m1, float m2, float s0, float s1, float s2,  \
                       int s_begin, int s_end) {                                                        \
    (void)n;                                                                                            \
    dm_host_mix_normalize<OUT, NHWC>(src, rec, masks, dst, h, w, m0, m1, m2, s0, s1, s2, s_begin,      \
                                     s_end);                                                            \
  }

DM_HOST_ENTRY(dalimix_host_mix_normalize_f32_nchw, DmOutF32, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f32_nhwc, DmOutF32, true)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f16_nchw, DmOutF16, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f16_nhwc, DmOutF16, true)
DM_HOST_ENTRY(dalimix_host_mix_normalize_bf16_nchw, DmOutBF16, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_bf16_nhwc, DmOutBF16, true)
