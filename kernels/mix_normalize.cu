// The fused batch-finishing kernel: gather partner + mix + normalise + cast + lay out, one pass.
//
// src:   uint8 images, N_src x H x W x 3 (HWC, as DALI hands them out), N_src >= n.
// rec:   n DmRecord, one per output sample (see dalimix_common.cuh).
// masks: float32 mask pool; sample s reads masks[rec[s].mask_offset ...] (mask_h x mask_w).
// dst:   n x 3 x H x W in NCHW, or the same tensor in channels_last memory order (N x H x W x 3).
// out = (mix(a, b) - mean255[c]) * inv_std255[c], computed in float32, then cast once.
//
// One thread per output pixel (all three channels), grid-stride loop; reads a's 3 bytes, the
// partner's 3 bytes only where the partner shows, writes 3 values once.
#include "dalimix_common.cuh"

__device__ __host__ __forceinline__ float dm_sample_mask(const DmRecord& r, const float* masks, int y,
                                                         int x, int h, int w) {
  const float* m = masks + r.mask_offset;
  float v;
  if (r.flags & DM_FLAG_BILINEAR) {
    int y0, y1, x0, x1;
    float wy, wx;
    dm_linear_coord(y, r.mask_h, h, &y0, &y1, &wy);
    dm_linear_coord(x, r.mask_w, w, &x0, &x1, &wx);
    const float* row0 = m + (dm_i64)y0 * r.mask_w;
    const float* row1 = m + (dm_i64)y1 * r.mask_w;
    v = (1.f - wy) * ((1.f - wx) * row0[x0] + wx * row0[x1]) +
        wy * ((1.f - wx) * row1[x0] + wx * row1[x1]);
  } else {
    int my = dm_nearest_index(y, r.mask_h, h);
    int mx = dm_nearest_index(x, r.mask_w, w);
    v = m[(dm_i64)my * r.mask_w + mx];
  }
  if (r.flags & DM_FLAG_SIGMOID) v = 1.f / (1.f + expf(-v));
  return v;
}

// GridMix: 0 (partner shows) inside a hole of the grid laid from the box corner, else 1.
__device__ __host__ __forceinline__ float dm_grid_weight(const DmRecord& r, int y, int x) {
  if (y < r.y0 || y >= r.y1 || x < r.x0 || x >= r.x1) return 1.f;
  return ((x - r.x0) % r.p0 < r.p2 && (y - r.y0) % r.p1 < r.p3) ? 0.f : 1.f;
}

// SmoothMix: 1 - g with g = exp(-(dy^2 + dx^2) / (2 sigma^2)), distances on a grid of period
// 2H x 2W centred on (H - 1/2, W - 1/2) and shifted by (p0, p1).
__device__ __host__ __forceinline__ float dm_smooth_weight(const DmRecord& r, int y, int x, int h, int w) {
  int py = 2 * h, px = 2 * w;
  int vy = (y + r.p0) % py;
  int vx = (x + r.p1) % px;
  if (vy < 0) vy += py;
  if (vx < 0) vx += px;
  float dy = (float)vy - 0.5f * (float)(py - 1);
  float dx = (float)vx - 0.5f * (float)(px - 1);
  return 1.f - expf(-(dy * dy + dx * dx) * r.f0);
}

// The whole partner image b, resized to the box (bh x bw), sampled at box-relative (dy, dx); with
// DM_FLAG_FLIP_PARTNER the mirrored b is resized (source columns taken as w - 1 - x).
__device__ __host__ __forceinline__ void dm_sample_resized(const unsigned char* b, int flags, int dy,
                                                           int dx, int bh, int bw, int h, int w,
                                                           float* o0, float* o1, float* o2) {
  if (flags & DM_FLAG_BILINEAR) {
    int y0, y1, x0, x1;
    float wy, wx;
    dm_linear_coord(dy, h, bh, &y0, &y1, &wy);
    dm_linear_coord(dx, w, bw, &x0, &x1, &wx);
    if (flags & DM_FLAG_FLIP_PARTNER) {
      x0 = w - 1 - x0;
      x1 = w - 1 - x1;
    }
    const unsigned char* p00 = b + ((dm_i64)y0 * w + x0) * 3;
    const unsigned char* p01 = b + ((dm_i64)y0 * w + x1) * 3;
    const unsigned char* p10 = b + ((dm_i64)y1 * w + x0) * 3;
    const unsigned char* p11 = b + ((dm_i64)y1 * w + x1) * 3;
    float c00 = (1.f - wy) * (1.f - wx), c01 = (1.f - wy) * wx;
    float c10 = wy * (1.f - wx), c11 = wy * wx;
    *o0 = c00 * p00[0] + c01 * p01[0] + c10 * p10[0] + c11 * p11[0];
    *o1 = c00 * p00[1] + c01 * p01[1] + c10 * p10[1] + c11 * p11[1];
    *o2 = c00 * p00[2] + c01 * p01[2] + c10 * p10[2] + c11 * p11[2];
  } else {
    int sy = dm_nearest_index(dy, h, bh);
    int sx = dm_nearest_index(dx, w, bw);
    if (flags & DM_FLAG_FLIP_PARTNER) sx = w - 1 - sx;
    const unsigned char* p = b + ((dm_i64)sy * w + sx) * 3;
    *o0 = p[0];
    *o1 = p[1];
    *o2 = p[2];
  }
}

// Normalise, cast and write pixel r = y * W + x of sample s.
template <class O, bool NHWC>
__device__ __host__ __forceinline__ void dm_store(typename O::T* __restrict__ dst, int s, dm_i64 r, dm_i64 plane,
                                                  float v0, float v1, float v2, float m0, float m1, float m2,
                                                  float s0, float s1, float s2) {
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

// One output pixel (all three channels) of sample s at (y, x); p = (s * H + y) * W + x. The flip
// flags mirror the columns read from a and b, never the output position.
template <class O, bool NHWC>
__device__ __host__ __forceinline__ void dm_mix_pixel(const unsigned char* __restrict__ src, const DmRecord& R,
                                                      const float* __restrict__ masks,
                                                      typename O::T* __restrict__ dst, int s, int y, int x,
                                                      int h, int w, dm_i64 plane, float m0, float m1,
                                                      float m2, float s0, float s1, float s2) {
  const dm_i64 r = (dm_i64)y * w + x;
  const dm_i64 row = (dm_i64)y * w;
  const int ax = (R.flags & DM_FLAG_FLIP_SELF) ? w - 1 - x : x;
  const unsigned char* pa = src + ((dm_i64)s * plane + row + ax) * 3;
  float v0 = pa[0], v1 = pa[1], v2 = pa[2];
  if (R.method != DM_METHOD_NONE) {
    const unsigned char* b = src + (dm_i64)R.partner * plane * 3;
    const bool in_box = y >= R.y0 && y < R.y1 && x >= R.x0 && x < R.x1;
    float wself = 1.f, b0 = 0.f, b1 = 0.f, b2 = 0.f;
    if (R.method == DM_METHOD_RESIZE) {
      if (in_box) {
        wself = 0.f;
        dm_sample_resized(b, R.flags, y - R.y0, x - R.x0, R.y1 - R.y0, R.x1 - R.x0, h, w, &b0, &b1, &b2);
      }
    } else {
      if (R.method == DM_METHOD_BLEND) wself = R.lam;
      else if (R.method == DM_METHOD_BOX) wself = in_box ? 0.f : 1.f;
      else if (R.method == DM_METHOD_MASK) wself = dm_sample_mask(R, masks, y, x, h, w);
      else if (R.method == DM_METHOD_GRID) wself = dm_grid_weight(R, y, x);
      else if (R.method == DM_METHOD_SMOOTH) wself = dm_smooth_weight(R, y, x, h, w);
      if (wself != 1.f) {
        const int bx = (R.flags & DM_FLAG_FLIP_PARTNER) ? w - 1 - x : x;
        const unsigned char* pb = b + (row + bx) * 3;
        b0 = pb[0];
        b1 = pb[1];
        b2 = pb[2];
      }
    }
    if (wself != 1.f) {
      v0 = b0 + wself * (v0 - b0);
      v1 = b1 + wself * (v1 - b1);
      v2 = b2 + wself * (v2 - b2);
    }
  }
  dm_store<O, NHWC>(dst, s, r, plane, v0, v1, v2, m0, m1, m2, s0, s1, s2);
}

// The CUDA kernel: a grid-stride loop over the n * H * W output pixels.
template <class O, bool NHWC>
__device__ __forceinline__ void dm_mix_normalize(const unsigned char* __restrict__ src,
                                                 const DmRecord* __restrict__ rec,
                                                 const float* __restrict__ masks,
                                                 typename O::T* __restrict__ dst, int n, int h,
                                                 int w, float m0, float m1, float m2, float s0,
                                                 float s1, float s2) {
  const dm_i64 plane = (dm_i64)h * w;
  const dm_i64 total = (dm_i64)n * plane;
  const dm_i64 stride = (dm_i64)gridDim.x * blockDim.x;
  for (dm_i64 p = (dm_i64)blockIdx.x * blockDim.x + threadIdx.x; p < total; p += stride) {
    const int s = (int)(p / plane);
    const dm_i64 r = p - (dm_i64)s * plane;
    const int y = (int)(r / w);
    const int x = (int)(r - (dm_i64)y * w);
    const DmRecord R = rec[s];
    dm_mix_pixel<O, NHWC>(src, R, masks, dst, s, y, x, h, w, plane, m0, m1, m2, s0, s1, s2);
  }
}

#define DM_MIX_NORMALIZE_ENTRY(NAME, OUT, NHWC)                                                    \
  extern "C" __global__ void NAME(const unsigned char* src, const DmRecord* rec,                  \
                                  const float* masks, OUT::T* dst, int n, int h, int w, float m0, \
                                  float m1, float m2, float s0, float s1, float s2) {             \
    dm_mix_normalize<OUT, NHWC>(src, rec, masks, dst, n, h, w, m0, m1, m2, s0, s1, s2);           \
  }

DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f32_nchw, DmOutF32, false)
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f32_nhwc, DmOutF32, true)
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f16_nchw, DmOutF16, false)
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f16_nhwc, DmOutF16, true)
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_bf16_nchw, DmOutBF16, false)
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_bf16_nhwc, DmOutBF16, true)
