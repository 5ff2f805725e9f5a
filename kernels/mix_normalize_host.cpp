// Host (CPU) entry points of the fused kernel: the very group code the GPU runs (dm_dispatch in
// mix_normalize.cu) called row by row, with straight vectorisable loops for the commonest cases. Compiled with the C++
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

#include <vector>

// Normalise, cast and write pixel r = y * W + x of sample s (the host loops' store).
template <class O, bool NHWC>
static inline void dm_store(typename O::T* __restrict__ dst, int s, dm_i64 r, dm_i64 plane, float v0, float v1,
                            float v2, float m0, float m1, float m2, float s0, float s1, float s2) {
  const typename O::T o0 = O::cvt((v0 - m0) * s0);
  const typename O::T o1 = O::cvt((v1 - m1) * s1);
  const typename O::T o2 = O::cvt((v2 - m2) * s2);
  if (NHWC) {
    typename O::T* q = dst + ((dm_i64)s * plane + r) * 3;
    q[0] = o0;
    q[1] = o1;
    q[2] = o2;
  } else {
    typename O::T* q = dst + (dm_i64)s * 3 * plane + r;
    q[0] = o0;
    q[plane] = o1;
    q[2 * plane] = o2;
  }
}

// Pixels x0 <= x < x1 of row y of one image (img: its first byte; read mirrored when flip)
// normalised into sample s of dst, unmixed.
template <class O, bool NHWC>
static inline void dm_host_span(const unsigned char* __restrict__ img, bool flip, typename O::T* __restrict__ dst,
                                int s, int y, int x0, int x1, int w, dm_i64 plane, float m0, float m1, float m2,
                                float s0, float s1, float s2) {
  const dm_i64 row = (dm_i64)y * w;
  const unsigned char* in = img + row * 3;
  if (!flip) {
    for (int x = x0; x < x1; ++x)
      dm_store<O, NHWC>(dst, s, row + x, plane, in[3 * x], in[3 * x + 1], in[3 * x + 2], m0, m1, m2, s0, s1, s2);
  } else {
    for (int x = x0; x < x1; ++x) {
      const unsigned char* q = in + 3 * (w - 1 - x);
      dm_store<O, NHWC>(dst, s, row + x, plane, q[0], q[1], q[2], m0, m1, m2, s0, s1, s2);
    }
  }
}

template <class O, bool NHWC>
static void dm_host_mix_normalize(const unsigned char* __restrict__ src, const DmRecord* __restrict__ rec,
                                  const float* __restrict__ masks, const int* __restrict__ gather,
                                  typename O::T* __restrict__ dst, int h, int w,
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
      const bool fa = (R.flags & DM_FLAG_FLIP_SELF) != 0, fb = (R.flags & DM_FLAG_FLIP_PARTNER) != 0;
      if (fa || (fb && lam != 1.f)) {
        // mirrored reads: row by row, the source column of each image taken from the right
        for (int y = 0; y < h; ++y) {
          const dm_i64 row = (dm_i64)y * w;
          const unsigned char* ra = a + row * 3;
          const unsigned char* rb = b + row * 3;
          for (int x = 0; x < w; ++x) {
            const unsigned char* pa = ra + 3 * (fa ? w - 1 - x : x);
            float v0 = pa[0], v1 = pa[1], v2 = pa[2];
            if (lam != 1.f) {
              const unsigned char* pb = rb + 3 * (fb ? w - 1 - x : x);
              const float b0 = pb[0], b1 = pb[1], b2 = pb[2];
              v0 = b0 + lam * (v0 - b0);
              v1 = b1 + lam * (v1 - b1);
              v2 = b2 + lam * (v2 - b2);
            }
            dm_store<O, NHWC>(dst, s, row + x, plane, v0, v1, v2, m0, m1, m2, s0, s1, s2);
          }
        }
        continue;
      }
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
    if (R.method == DM_METHOD_BOX) {
      // CutMix: each row is at most three straight spans, own / partner / own
      const unsigned char* a = src + (dm_i64)s * plane * 3;
      const unsigned char* b = src + (dm_i64)R.partner * plane * 3;
      const bool fa = (R.flags & DM_FLAG_FLIP_SELF) != 0, fb = (R.flags & DM_FLAG_FLIP_PARTNER) != 0;
      for (int y = 0; y < h; ++y) {
        if (y < R.y0 || y >= R.y1 || R.x0 >= R.x1) {
          dm_host_span<O, NHWC>(a, fa, dst, s, y, 0, w, w, plane, m0, m1, m2, s0, s1, s2);
        } else {
          dm_host_span<O, NHWC>(a, fa, dst, s, y, 0, R.x0, w, plane, m0, m1, m2, s0, s1, s2);
          dm_host_span<O, NHWC>(b, fb, dst, s, y, R.x0, R.x1, w, plane, m0, m1, m2, s0, s1, s2);
          dm_host_span<O, NHWC>(a, fa, dst, s, y, R.x1, w, w, plane, m0, m1, m2, s0, s1, s2);
        }
      }
      continue;
    }
    if (R.method == DM_METHOD_MASK && !(R.flags & (DM_FLAG_BILINEAR | DM_FLAG_SIGMOID | DM_FLAG_GATHER))) {
      // FMix and nearest hook masks: the mask row and column of every pixel looked up once per sample
      const unsigned char* a = src + (dm_i64)s * plane * 3;
      const unsigned char* b = src + (dm_i64)R.partner * plane * 3;
      const bool fa = (R.flags & DM_FLAG_FLIP_SELF) != 0, fb = (R.flags & DM_FLAG_FLIP_PARTNER) != 0;
      std::vector<int> col(w);
      for (int x = 0; x < w; ++x) col[x] = dm_nearest_index(x, R.mask_w, w);
      for (int y = 0; y < h; ++y) {
        const float* mrow = masks + R.mask_offset + (dm_i64)dm_nearest_index(y, R.mask_h, h) * R.mask_w;
        const dm_i64 row = (dm_i64)y * w;
        for (int x = 0; x < w; ++x) {
          const dm_i64 r = row + x;
          const float wself = mrow[col[x]];
          const unsigned char* pa = a + 3 * (row + (fa ? w - 1 - x : x));
          const unsigned char* pb = b + 3 * (row + (fb ? w - 1 - x : x));
          const float b0 = pb[0], b1 = pb[1], b2 = pb[2];
          const float v0 = b0 + wself * (pa[0] - b0);
          const float v1 = b1 + wself * (pa[1] - b1);
          const float v2 = b2 + wself * (pa[2] - b2);
          dm_store<O, NHWC>(dst, s, r, plane, v0, v1, v2, m0, m1, m2, s0, s1, s2);
        }
      }
      continue;
    }
    // everything else: the GPU kernel's own group code, one row at a time (memory order)
    const DmNorm N = {m0, m1, m2, s0, s1, s2, -m0 * s0, -m1 * s1, -m2 * s2};
    const bool vec = dm_vector_ok(src, dst, w);
    const int kind = dm_kind(R);
    for (int y = 0; y < h; ++y) {
      if (vec) dm_dispatch<O, NHWC, true>(kind, src, rec, masks, gather, dst, s, h, w, N, 0, 1, y, h);
      else dm_dispatch<O, NHWC, false>(kind, src, rec, masks, gather, dst, s, h, w, N, 0, 1, y, h);
    }
  }
}

#define DM_HOST_ENTRY(NAME, OUT, NHWC)                                                                  \
  extern "C" void NAME(const unsigned char* src, const DmRecord* rec, const float* masks,               \
                       const int* gather, OUT::T* dst, int n, int h, int w, float m0, float m1,         \
                       float m2, float s0, float s1, float s2, int s_begin, int s_end) {                \
    (void)n;                                                                                            \
    dm_host_mix_normalize<OUT, NHWC>(src, rec, masks, gather, dst, h, w, m0, m1, m2, s0, s1, s2,       \
                                     s_begin, s_end);                                                   \
  }

DM_HOST_ENTRY(dalimix_host_mix_normalize_f32_nchw, DmOutF32, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f32_nhwc, DmOutF32, true)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f16_nchw, DmOutF16, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f16_nhwc, DmOutF16, true)
DM_HOST_ENTRY(dalimix_host_mix_normalize_bf16_nchw, DmOutBF16, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_bf16_nhwc, DmOutBF16, true)
