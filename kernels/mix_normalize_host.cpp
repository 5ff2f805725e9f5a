// Host (CPU) entry points of the fused kernel: the very group code the GPU runs (dm_dispatch in
// mix_normalize.cu) called row by row, with straight vectorisable loops for the commonest cases. Compiled with the C++
// compiler at run time by dalimix.ops.host (never by nvcc or NVRTC); each call handles samples
// [s_begin, s_end), so callers spread a batch over threads. Random erasing (erase table, last
// argument) rewrites each sample's boxes right after the sample is written, box by box in drawing
// order (a later box over an earlier one: what the kernel's "box on top" gives), with the
// kernel's own fill and noise functions.
#include <math.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// the CUDA entry points in mix_normalize.cu refer to these; the host loops below do not use them
struct dm_host_dim3 { unsigned int x, y, z; };
static thread_local dm_host_dim3 blockIdx, threadIdx, blockDim, gridDim;

#include "mix_normalize.cu"

#include <string.h>
#if defined(__SSSE3__)
#include <tmmintrin.h>
#endif

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

// Row `in` (w RGB pixels) mirrored left-right into `out` (3 * w + 1 bytes) through `stage` (3 * w
// bytes): mirrored reads become straight ones the compiler vectorises (a reversed, stride-3 read in
// the arithmetic loop does not). The row is first copied forwards (the order the prefetcher
// follows), then reversed in cache.
static inline void dm_mirror_row(const unsigned char* __restrict__ in, unsigned char* __restrict__ out,
                                 unsigned char* __restrict__ stage, int w) {
  memcpy(stage, in, 3 * (size_t)w);
  int x = 0;
#if defined(__SSSE3__)
  // five pixels per 16-byte shuffle: the load ends at the group's last byte, so it starts one byte
  // before the group (inside the row while x + 6 <= w); each store's 16th byte is overwritten by
  // the next group, or lands in `out`'s spare byte
  const __m128i rev5 = _mm_setr_epi8(13, 14, 15, 10, 11, 12, 7, 8, 9, 4, 5, 6, 1, 2, 3, -128);
  for (; x + 6 <= w; x += 5) {
    const __m128i v = _mm_loadu_si128((const __m128i*)(stage + 3 * (w - 5 - x) - 1));
    _mm_storeu_si128((__m128i*)(out + 3 * x), _mm_shuffle_epi8(v, rev5));
  }
#endif
  for (; x < w; ++x) {
    const unsigned char* q = stage + 3 * (dm_i64)(w - 1 - x);
    out[3 * x] = q[0];
    out[3 * x + 1] = q[1];
    out[3 * x + 2] = q[2];
  }
}

// Pixels x0 <= x < x1 of one row (`in`: its first pixel, already mirrored if it is read so) normalised
// into row `row` of sample s of dst, unmixed.
template <class O, bool NHWC>
static inline void dm_host_span(const unsigned char* __restrict__ in, typename O::T* __restrict__ dst, int s,
                                dm_i64 row, int x0, int x1, dm_i64 plane, float m0, float m1, float m2, float s0,
                                float s1, float s2) {
  for (int x = x0; x < x1; ++x)
    dm_store<O, NHWC>(dst, s, row + x, plane, in[3 * x], in[3 * x + 1], in[3 * x + 2], m0, m1, m2, s0, s1, s2);
}

// One row blended: out = (b + lam * (a - b) - m) * s over x in [0, w) (ra, rb: the rows as read).
template <class O, bool NHWC>
static inline void dm_host_blend_row(const unsigned char* __restrict__ ra, const unsigned char* __restrict__ rb,
                                     float lam, typename O::T* __restrict__ dst, int s, dm_i64 row, int w,
                                     dm_i64 plane, float m0, float m1, float m2, float s0, float s1, float s2) {
  for (int x = 0; x < w; ++x) {
    const float b0 = rb[3 * x], b1 = rb[3 * x + 1], b2 = rb[3 * x + 2];
    const float v0 = b0 + lam * (ra[3 * x] - b0);
    const float v1 = b1 + lam * (ra[3 * x + 1] - b1);
    const float v2 = b2 + lam * (ra[3 * x + 2] - b2);
    dm_store<O, NHWC>(dst, s, row + x, plane, v0, v1, v2, m0, m1, m2, s0, s1, s2);
  }
}

// Sample output `out` (3 x H x W, or H x W x 3) erased by table row t: straight spans per box row.
template <class O, bool NHWC>
static void dm_host_erase(const int* __restrict__ t, typename O::T* __restrict__ out, int h, int w) {
  const dm_i64 plane = (dm_i64)h * w;
  const int count = t[0], mode = t[1];
  for (int b = 0; b < count; ++b) {
    const int* q = t + DM_ERASE_BOXES + 4 * b;
    const int y0 = q[0], x0 = q[1], y1 = q[2], x1 = q[3];
    if (y0 >= y1 || x0 >= x1) continue;
    const unsigned int bk = dm_erase_box_key((unsigned int)t[2], b);
    typename O::T fill[3];
    for (int c = 0; c < 3; ++c) fill[c] = O::cvt(dm_erase_fill(t, mode, bk, b, 0u, c));
    for (int y = y0; y < y1; ++y) {
      const dm_i64 row = (dm_i64)y * w;
      for (int x = x0; x < x1; ++x) {
        const unsigned int e = (unsigned int)(row + x) * 3u;
        for (int c = 0; c < 3; ++c) {
          const typename O::T v = mode == DM_ERASE_PIXEL ? O::cvt(dm_erase_normal(bk, e + (unsigned int)c)) : fill[c];
          if (NHWC) out[(row + x) * 3 + c] = v;
          else out[c * plane + row + x] = v;
        }
      }
    }
  }
}

// Sample s's boxes of the erase table (if any), after the sample was written.
template <class O, bool NHWC>
static inline void dm_host_erase_sample(const int* __restrict__ erase, typename O::T* __restrict__ dst, int s, int h,
                                        int w) {
  if (erase && erase[(dm_i64)s * DM_ERASE_STRIDE] > 0)
    dm_host_erase<O, NHWC>(erase + (dm_i64)s * DM_ERASE_STRIDE, dst + (dm_i64)s * h * w * 3, h, w);
}

template <class O, bool NHWC>
static void dm_host_mix_normalize(const unsigned char* __restrict__ src, const DmRecord* __restrict__ rec,
                                  const float* __restrict__ masks, const int* __restrict__ gather,
                                  typename O::T* __restrict__ dst, int h, int w,
                                  float m0, float m1, float m2, float s0, float s1, float s2, int s_begin,
                                  int s_end, const int* __restrict__ erase) {
  const dm_i64 plane = (dm_i64)h * w;
  // mirrored rows, and the copy each is reversed from
  std::vector<unsigned char> tmp_a(3 * (size_t)w + 1), tmp_b(3 * (size_t)w + 1), stage(3 * (size_t)w);
  // each method's branch ends in `continue`: the loop's step erases the sample just written
  for (int s = s_begin; s < s_end; dm_host_erase_sample<O, NHWC>(erase, dst, s, h, w), ++s) {
    const DmRecord R = rec[s];
    if (R.method == DM_METHOD_NONE || R.method == DM_METHOD_BLEND) {
      // the common cases as straight loops the compiler vectorises: out = (b + lam * (a - b) - m) * s
      const float lam = R.method == DM_METHOD_NONE ? 1.f : R.lam;
      const unsigned char* a = src + (dm_i64)s * plane * 3;
      const unsigned char* b = src + (dm_i64)(R.method == DM_METHOD_NONE ? s : R.partner) * plane * 3;
      const bool fa = (R.flags & DM_FLAG_FLIP_SELF) != 0, fb = (R.flags & DM_FLAG_FLIP_PARTNER) != 0;
      if (fa || (fb && lam != 1.f)) {
        // mirrored reads: row by row, each mirrored row copied out first
        for (int y = 0; y < h; ++y) {
          const dm_i64 row = (dm_i64)y * w;
          const unsigned char* ra = a + row * 3;
          if (fa) {
            dm_mirror_row(ra, tmp_a.data(), stage.data(), w);
            ra = tmp_a.data();
          }
          if (lam == 1.f) {
            dm_host_span<O, NHWC>(ra, dst, s, row, 0, w, plane, m0, m1, m2, s0, s1, s2);
            continue;
          }
          const unsigned char* rb = b + row * 3;
          if (fb) {
            dm_mirror_row(rb, tmp_b.data(), stage.data(), w);
            rb = tmp_b.data();
          }
          dm_host_blend_row<O, NHWC>(ra, rb, lam, dst, s, row, w, plane, m0, m1, m2, s0, s1, s2);
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
        const dm_i64 row = (dm_i64)y * w;
        const unsigned char* ra = a + row * 3;
        if (fa) {
          dm_mirror_row(ra, tmp_a.data(), stage.data(), w);
          ra = tmp_a.data();
        }
        if (y < R.y0 || y >= R.y1 || R.x0 >= R.x1) {
          dm_host_span<O, NHWC>(ra, dst, s, row, 0, w, plane, m0, m1, m2, s0, s1, s2);
        } else {
          const unsigned char* rb = b + row * 3;
          if (fb) {
            dm_mirror_row(rb, tmp_b.data(), stage.data(), w);
            rb = tmp_b.data();
          }
          dm_host_span<O, NHWC>(ra, dst, s, row, 0, R.x0, plane, m0, m1, m2, s0, s1, s2);
          dm_host_span<O, NHWC>(rb, dst, s, row, R.x0, R.x1, plane, m0, m1, m2, s0, s1, s2);
          dm_host_span<O, NHWC>(ra, dst, s, row, R.x1, w, plane, m0, m1, m2, s0, s1, s2);
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
        const unsigned char* ra = a + row * 3;
        const unsigned char* rb = b + row * 3;
        if (fa) {
          dm_mirror_row(ra, tmp_a.data(), stage.data(), w);
          ra = tmp_a.data();
        }
        if (fb) {
          dm_mirror_row(rb, tmp_b.data(), stage.data(), w);
          rb = tmp_b.data();
        }
        for (int x = 0; x < w; ++x) {
          const dm_i64 r = row + x;
          const float wself = mrow[col[x]];
          const unsigned char* pa = ra + 3 * x;
          const unsigned char* pb = rb + 3 * x;
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
                       float m2, float s0, float s1, float s2, int s_begin, int s_end,                  \
                       const int* erase) {                                                              \
    (void)n;                                                                                            \
    dm_host_mix_normalize<OUT, NHWC>(src, rec, masks, gather, dst, h, w, m0, m1, m2, s0, s1, s2,       \
                                     s_begin, s_end, erase);                                            \
  }

DM_HOST_ENTRY(dalimix_host_mix_normalize_f32_nchw, DmOutF32, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f32_nhwc, DmOutF32, true)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f16_nchw, DmOutF16, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_f16_nhwc, DmOutF16, true)
DM_HOST_ENTRY(dalimix_host_mix_normalize_bf16_nchw, DmOutBF16, false)
DM_HOST_ENTRY(dalimix_host_mix_normalize_bf16_nhwc, DmOutBF16, true)
