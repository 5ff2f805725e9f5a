// The fused batch-finishing kernel: gather partner + flip + mix + normalise + cast + lay out, one pass.
//
// src:   uint8 images, N_src x H x W x 3 (HWC, as DALI hands them out), N_src >= n.
// rec:   n DmRecord, one per output sample (see dalimix_common.cuh).
// masks: float32 mask pool; sample s reads masks[rec[s].mask_offset ...] (mask_h x mask_w).
// gather: int32 block permutations (MASK + DM_FLAG_GATHER): sample s reads gather[rec[s].p0 ...]
//        (p1 x p2 values); output block j shows the partner's block gather[p0 + j] (row-major), and
//        with DM_FLAG_GATHER_SELF the own image's block gather[p3 + j].
// dst:   n x 3 x H x W in NCHW, or the same tensor in channels_last memory order (N x H x W x 3).
// erase: null, or n rows of DM_ERASE_STRIDE int32: random erasing boxes (dalimix_common.cuh).
// out = (mix(a, b) - mean255[c]) * inv_std255[c], computed in float32, then cast once; inside an
// erasing box the fill (0, the box's colour, or hash noise: normalised values) replaces it.
//
// Memory-bound by construction:
// - the sample is on blockIdx.z (grid-stride), so its record is loaded once per block and no
//   pixel index is ever divided; within a sample all index math is 32-bit (h * w * 3 < 2^32, which
//   dalimix.ops checks), only the per-sample base pointers are 64-bit;
// - each thread owns a group of DM_PIX = 4 pixels of a row (blockIdx.x / threadIdx.x) and walks
//   down the rows (blockIdx.y / threadIdx.y, grid-stride), so everything that depends on the column
//   only (mask / resize taps, grid and blob columns, box edges) is computed once per column;
// - where W is a multiple of 4 and the buffers are 16-byte aligned ("vector" path): the 4 pixels
//   of a and b are read as 3 aligned 32-bit words each, the output is written with one 16-byte
//   (float32) or 8-byte (16-bit) store per channel (NCHW) or three (channels_last); other widths
//   take the scalar path of the same code, pixel by pixel, with bounds checks;
// - fp16/bf16 pairs are converted by one hardware cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32 on sm_80+;
// - the method (and nearest/bilinear sampling) is dispatched once per sample into its own loop.
// The partner is read only for groups where it shows (BOX, GRID, MASK weight 1 everywhere skip it).
// Erasing: a sample's table row is read once per sample; count 0 (or no table) adds nothing to the
// pass. Otherwise, after its mixing loop, the thread that wrote groups of the sample overwrites the
// pixels of those groups that lie in a box (the rows and columns the boxes cover, nothing else):
// the same launch, the same thread, lines just written; one loop per entry point, not per method.
// No shared memory, no barriers: the same source runs on the CPU through the host shim.
#include "dalimix_common.cuh"

#define DM_PIX 4  // pixels per thread and row

#define DM_BLOCK 256  // at most this many threads per block (dalimix.ops.kernels.launch_config)

#if defined(__CUDACC__)
#define DM_UNROLL _Pragma("unroll")
#define DM_NO_UNROLL _Pragma("unroll 1")
// 64 registers per thread: 4 blocks of 256 threads (50% occupancy) per SM, no spills (tests check)
#define DM_LAUNCH_BOUNDS __launch_bounds__(DM_BLOCK, 4)
#else
#define DM_UNROLL
#define DM_NO_UNROLL
#define DM_LAUNCH_BOUNDS
#endif

// Per-sample loop variants: the record's method with its sampling mode.
enum {
  DMK_NONE = 0,
  DMK_BLEND,
  DMK_BOX,
  DMK_MASK_NEAREST,
  DMK_MASK_BILINEAR,
  DMK_MASK_NEAREST_SIGMOID,   // logits: the sigmoid after upsampling
  DMK_MASK_BILINEAR_SIGMOID,
  DMK_RESIZE_NEAREST,
  DMK_RESIZE_BILINEAR,
  DMK_GRID,
  DMK_SMOOTH,
  DMK_MASK_NEAREST_GATHER,   // the partner block-permuted (DM_FLAG_GATHER); sigmoid from the flags
  DMK_MASK_BILINEAR_GATHER,
  DMK_MASK_NEAREST_GATHER_SELF  // both images block-permuted (+ DM_FLAG_GATHER_SELF; nearest masks only:
                                // a bilinear twin spills in the f32 entries); sigmoid from the flags
};

struct DmNorm {
  float m0, m1, m2, s0, s1, s2;  // 255 * mean and 1 / (255 * std) per channel
  float o0, o1, o2;              // -m * s: out = fma(v, s, -m s), one instruction per value
};

// One sample's buffers. Offsets inside a sample are 32-bit.
template <class O>
struct DmSample {
  const unsigned char* a;  // the sample's own image, H x W x 3
  const unsigned char* b;  // the partner image
  const float* mask;       // this sample's low-res mask (MASK)
  const int* gather;       // this sample's block permutation (MASK + DM_FLAG_GATHER)
  const int* gather_self;  // the own image's block permutation (+ DM_FLAG_GATHER_SELF)
  typename O::T* out;      // this sample's output: 3 x H x W, or H x W x 3 (channels_last)
  int h, w;
  unsigned int plane;      // h * w
};

struct alignas(16) DmWords4 {
  unsigned int v[4];
};
struct alignas(8) DmWords2 {
  unsigned int v[2];
};

__device__ __host__ __forceinline__ unsigned int dm_load_word(const unsigned char* p) {
#ifdef __CUDA_ARCH__
  return *(const unsigned int*)p;
#else
  unsigned int v;
  __builtin_memcpy(&v, p, 4);
  return v;
#endif
}

// One 16-byte / 8-byte store (the address is aligned: the vector path's condition).
__device__ __host__ __forceinline__ void dm_store_words(void* p, const DmWords4& u) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.v[0]), "r"(u.v[1]), "r"(u.v[2]), "r"(u.v[3])
               : "memory");
#else
  __builtin_memcpy(p, &u, sizeof(u));
#endif
}
__device__ __host__ __forceinline__ void dm_store_words(void* p, const DmWords2& u) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(u.v[0]), "r"(u.v[1]) : "memory");
#else
  __builtin_memcpy(p, &u, sizeof(u));
#endif
}

// Byte permute (PTX prmt / __byte_perm): byte i of the result is byte sel[4i+3:4i] of {y, x}.
__device__ __host__ __forceinline__ unsigned int dm_byte_perm(unsigned int x, unsigned int y, unsigned int sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, sel);
#else
  const unsigned long long v = (unsigned long long)x | ((unsigned long long)y << 32);
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((sel >> (4 * i)) & 7u))) & 255u) << (8 * i);
  return r;
#endif
}

// The 4 pixels x0..x0+3 of row `row` (= y * W) of img, packed as they lie in memory: 12 bytes
// (pixel k channel c is byte 3k + c) in 3 words q[0..2]; mirrored (source column W-1-x) when flip.
// VEC: 3 aligned word loads (and 4 byte permutes to mirror); else byte by byte, 0 past the row's end.
template <bool VEC>
__device__ __host__ __forceinline__ void dm_load_pixels(const unsigned char* __restrict__ img, unsigned int row,
                                                        int x0, int w, bool flip, unsigned int* q) {
  if (VEC) {
    const int gx = flip ? w - DM_PIX - x0 : x0;
    const unsigned char* p = img + (row + (unsigned int)gx) * 3u;
    const unsigned int q0 = dm_load_word(p), q1 = dm_load_word(p + 4), q2 = dm_load_word(p + 8);
    if (flip) {  // pixels 3 2 1 0
      q[0] = dm_byte_perm(q2, q1, 0x6321u);
      q[1] = dm_byte_perm(dm_byte_perm(q1, q2, 0x0043u), q0, 0x2710u);
      q[2] = dm_byte_perm(q0, q1, 0x2105u);
    } else {
      q[0] = q0;
      q[1] = q1;
      q[2] = q2;
    }
  } else {
    q[0] = q[1] = q[2] = 0u;
DM_UNROLL
    for (int k = 0; k < DM_PIX; ++k) {
      const int x = x0 + k;
      if (x < w) {
        const unsigned char* p = img + (row + (unsigned int)(flip ? w - 1 - x : x)) * 3u;
DM_UNROLL
        for (int c = 0; c < 3; ++c) q[(3 * k + c) >> 2] |= (unsigned int)p[c] << (8 * ((3 * k + c) & 3));
      }
    }
  }
}

// Byte i (0..11) of packed pixels plus 2^23, as a float: the byte lands in the mantissa of
// 0x4B000000 (one byte permute on the GPU), so value = float - 2^23 and a - b = (a + 2^23) -
// (b + 2^23), both exact, with no integer-to-float conversion.
#define DM_BIAS 8388608.f
__device__ __host__ __forceinline__ float dm_biased(const unsigned int* q, int i) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(__byte_perm(0x4B000000u, q[i >> 2], (unsigned int)(4 + (i & 3)) | 0x3000u));
#else
  return dm_bits_float(0x4B000000u | ((q[i >> 2] >> (8 * (i & 3))) & 255u));
#endif
}
__device__ __host__ __forceinline__ float dm_byte(const unsigned int* q, int i) { return dm_biased(q, i) - DM_BIAS; }

// Sources of the 12 values (pixel k channel c at 3k + c) that dm_store_pixels writes.
struct DmFromA {  // the sample's own pixels
  const unsigned int* a;
  __device__ __host__ __forceinline__ float operator()(int i) const { return dm_byte(a, i); }
};
struct DmFromMix {  // b + w (a - b), w = weight of the own image per pixel
  const unsigned int* a;
  const unsigned int* b;
  const float* wself;
  __device__ __host__ __forceinline__ float operator()(int i) const {
    const float bb = dm_biased(b, i);
    return fmaf(wself[i / 3], dm_biased(a, i) - bb, bb - DM_BIAS);
  }
};
struct DmFromGathered {  // b + w (a - b), b byte by byte from per-pixel offsets (DMK_MASK_*_GATHER)
  const unsigned int* a;
  const unsigned char* b;
  const unsigned int* off;
  const float* wself;
  __device__ __host__ __forceinline__ float operator()(int i) const {
    const float bb = (float)b[off[i / 3] + (unsigned int)(i % 3)];
    return fmaf(wself[i / 3], dm_byte(a, i) - bb, bb);
  }
};
struct DmFromFloats {  // computed values
  const float* v;
  __device__ __host__ __forceinline__ float operator()(int i) const { return v[i]; }
};

// Normalise (v * s - m * s, one fma), cast and write the 4 pixels src(3k + c) at x0.. of row `row`.
template <class O, bool NHWC, bool VEC, class Src>
__device__ __host__ __forceinline__ void dm_store_pixels(const DmSample<O>& S, const DmNorm& N, unsigned int row,
                                                         int x0, const Src& src) {
  typedef typename O::T T;
#define DM_OUT(i) fmaf(src(i), (i) % 3 == 0 ? N.s0 : (i) % 3 == 1 ? N.s1 : N.s2, \
                        (i) % 3 == 0 ? N.o0 : (i) % 3 == 1 ? N.o1 : N.o2)
  if (NHWC) {
    T* q = S.out + (row + (unsigned int)x0) * 3u;
    if (VEC) {
DM_UNROLL
      for (int i = 0; i < 3; ++i) {
        if (O::kBytes == 4) {
          DmWords4 u;
DM_UNROLL
          for (int j = 0; j < 4; ++j) u.v[j] = dm_float_bits(DM_OUT(4 * i + j));
          dm_store_words(q + 4 * i, u);
        } else {
          DmWords2 u;
          u.v[0] = O::pack2(DM_OUT(4 * i), DM_OUT(4 * i + 1));
          u.v[1] = O::pack2(DM_OUT(4 * i + 2), DM_OUT(4 * i + 3));
          dm_store_words(q + 4 * i, u);
        }
      }
    } else {
DM_UNROLL
      for (int k = 0; k < DM_PIX; ++k)
        if (x0 + k < S.w) {
          q[3 * k] = O::cvt(DM_OUT(3 * k));
          q[3 * k + 1] = O::cvt(DM_OUT(3 * k + 1));
          q[3 * k + 2] = O::cvt(DM_OUT(3 * k + 2));
        }
    }
  } else {
DM_UNROLL
    for (int c = 0; c < 3; ++c) {
      T* q = S.out + (unsigned int)c * S.plane + row + (unsigned int)x0;
      if (VEC) {
        if (O::kBytes == 4) {
          DmWords4 u;
DM_UNROLL
          for (int k = 0; k < 4; ++k) u.v[k] = dm_float_bits(DM_OUT(3 * k + c));
          dm_store_words(q, u);
        } else {
          DmWords2 u;
          u.v[0] = O::pack2(DM_OUT(c), DM_OUT(3 + c));
          u.v[1] = O::pack2(DM_OUT(6 + c), DM_OUT(9 + c));
          dm_store_words(q, u);
        }
      } else {
DM_UNROLL
        for (int k = 0; k < DM_PIX; ++k)
          if (x0 + k < S.w) q[k] = O::cvt(DM_OUT(3 * k + c));
      }
    }
  }
#undef DM_OUT
}

// The whole partner b, resized to the box (bh x bw) and sampled at box-relative (dy, dx) into v[0..2]
// (F.interpolate's rules); with flip the mirrored b is resized (source columns W-1-x).
template <bool BILINEAR>
__device__ __host__ __forceinline__ void dm_sample_resized(const unsigned char* __restrict__ b, bool flip, int dy,
                                                           int dx, int bh, int bw, int h, int w, float* v) {
  if (BILINEAR) {
    int y0, y1, x0, x1;
    float wy, wx;
    dm_linear_coord(dy, h, bh, &y0, &y1, &wy);
    dm_linear_coord(dx, w, bw, &x0, &x1, &wx);
    if (flip) {
      x0 = w - 1 - x0;
      x1 = w - 1 - x1;
    }
    const unsigned int r0 = (unsigned int)y0 * (unsigned int)w, r1 = (unsigned int)y1 * (unsigned int)w;
    const unsigned char* p00 = b + (r0 + (unsigned int)x0) * 3u;
    const unsigned char* p01 = b + (r0 + (unsigned int)x1) * 3u;
    const unsigned char* p10 = b + (r1 + (unsigned int)x0) * 3u;
    const unsigned char* p11 = b + (r1 + (unsigned int)x1) * 3u;
    const float c00 = (1.f - wy) * (1.f - wx), c01 = (1.f - wy) * wx;
    const float c10 = wy * (1.f - wx), c11 = wy * wx;
DM_UNROLL
    for (int c = 0; c < 3; ++c) v[c] = c00 * p00[c] + c01 * p01[c] + c10 * p10[c] + c11 * p11[c];
  } else {
    const int sy = dm_nearest_index(dy, h, bh);
    int sx = dm_nearest_index(dx, w, bw);
    if (flip) sx = w - 1 - sx;
    const unsigned char* p = b + ((unsigned int)sy * (unsigned int)w + (unsigned int)sx) * 3u;
    v[0] = p[0];
    v[1] = p[1];
    v[2] = p[2];
  }
}

// One group: the 4 pixels x0..x0+3 of row y of sample S, mixed by loop variant K.
template <class O, bool NHWC, int K, bool VEC>
__device__ __host__ __forceinline__ void dm_group(const DmRecord& R, const DmSample<O>& S, const DmNorm& N, int y,
                                                  int x0) {
  const int h = S.h, w = S.w;
  const unsigned int row = (unsigned int)y * (unsigned int)w;
  const bool self = K == DMK_MASK_NEAREST_GATHER_SELF;
  unsigned int qa[3];  // the own pixels as they lie (DMK_MASK_NEAREST_GATHER_SELF reads them through its table)
  if (!self) dm_load_pixels<VEC>(S.a, row, x0, w, (R.flags & DM_FLAG_FLIP_SELF) != 0, qa);
  if (K == DMK_RESIZE_NEAREST || K == DMK_RESIZE_BILINEAR) {
    // the partner resized into the box replaces the pixels there
    float v[12];
DM_UNROLL
    for (int i = 0; i < 12; ++i) v[i] = dm_byte(qa, i);
    if (y >= R.y0 && y < R.y1) {
DM_UNROLL
      for (int k = 0; k < DM_PIX; ++k) {
        const int x = x0 + k;
        if (x >= R.x0 && x < R.x1 && x < w)
          dm_sample_resized<K == DMK_RESIZE_BILINEAR>(S.b, (R.flags & DM_FLAG_FLIP_PARTNER) != 0, y - R.y0, x - R.x0,
                                                      R.y1 - R.y0, R.x1 - R.x0, h, w, v + 3 * k);
      }
    }
    dm_store_pixels<O, NHWC, VEC>(S, N, row, x0, DmFromFloats{v});
    return;
  }
  if (self) {
    // both images block-permuted (nearest mask, sigmoid from the flags): pixel by pixel, each own and
    // partner pixel read from its source block at the same in-block offset, mixed, normalised and
    // stored on its own (scalar stores: the four-pixel vector path spills registers here)
    const int gh = R.p1, gw = R.p2;
    const int by = dm_block_of(y, h, gh);
    const float* mrow = S.mask + (unsigned int)dm_nearest_index(y, R.mask_h, h) * (unsigned int)R.mask_w;
DM_NO_UNROLL
    for (int k = 0; k < DM_PIX; ++k) {
      const int x = x0 + k;
      if (x >= w) break;
      float m = mrow[dm_nearest_index(x, R.mask_w, w)];
      if (R.flags & DM_FLAG_SIGMOID) m = 1.f / (1.f + expf(-m));
      const int bx = dm_block_of(x, w, gw);
      const unsigned char* pb = S.b + dm_gathered_offset(y, x, by, bx, (unsigned int)S.gather[by * gw + bx], h, w, gh,
                                                         gw, R.flags & DM_FLAG_FLIP_PARTNER);
      const unsigned char* pa = S.a + dm_gathered_offset(y, x, by, bx, (unsigned int)S.gather_self[by * gw + bx], h, w,
                                                         gh, gw, R.flags & DM_FLAG_FLIP_SELF);
      const unsigned int r = row + (unsigned int)x;
DM_NO_UNROLL
      for (int c = 0; c < 3; ++c) {
        const float bb = (float)pb[c];
        const float v = fmaf(fmaf(m, (float)pa[c] - bb, bb), c == 0 ? N.s0 : c == 1 ? N.s1 : N.s2,
                             c == 0 ? N.o0 : c == 1 ? N.o1 : N.o2);
        if (NHWC) S.out[r * 3u + (unsigned int)c] = O::cvt(v);
        else S.out[(unsigned int)c * S.plane + r] = O::cvt(v);
      }
    }
    return;
  }
  if (K == DMK_MASK_NEAREST_GATHER || K == DMK_MASK_BILINEAR_GATHER) {
    // the mask as DMK_MASK_* reads it (the sigmoid from the flags); the partner pixel of output block
    // (by, bx) read from its source block gather[by * gw + bx] at the same in-block offset (dm_gather_coord),
    // from the mirrored partner when flipped: 4 byte offsets, then the values byte by byte
    float wself[DM_PIX];
    unsigned int off[DM_PIX];
    const int mh = R.mask_h, mw = R.mask_w, gh = R.p1, gw = R.p2;
    const int by = dm_block_of(y, h, gh);
    int my0, my1;
    float wy = 0.f;
    if (K == DMK_MASK_BILINEAR_GATHER) dm_linear_coord(y, mh, h, &my0, &my1, &wy);
    else my0 = my1 = dm_nearest_index(y, mh, h);
    const float* r0 = S.mask + (unsigned int)my0 * (unsigned int)mw;
    const float* r1 = S.mask + (unsigned int)my1 * (unsigned int)mw;
    bool need = false;
    // not unrolled: wself / off then live in local memory (32 bytes a thread, L1), which keeps every
    // variant of the kernel within its 64 registers without spills (unrolled, nvcc spills here)
DM_NO_UNROLL
    for (int k = 0; k < DM_PIX; ++k) {
      const int x = x0 + k < w ? x0 + k : w - 1;
      float m;
      if (K == DMK_MASK_BILINEAR_GATHER) {
        int mx0, mx1;
        float wx;
        dm_linear_coord(x, mw, w, &mx0, &mx1, &wx);
        m = (1.f - wy) * ((1.f - wx) * r0[mx0] + wx * r0[mx1]) + wy * ((1.f - wx) * r1[mx0] + wx * r1[mx1]);
      } else {
        m = r0[dm_nearest_index(x, mw, w)];
      }
      if (R.flags & DM_FLAG_SIGMOID) m = 1.f / (1.f + expf(-m));
      wself[k] = m;
      need |= m != 1.f;
      const int bx = dm_block_of(x, w, gw);
      off[k] = dm_gathered_offset(y, x, by, bx, (unsigned int)S.gather[by * gw + bx], h, w, gh, gw,
                                  R.flags & DM_FLAG_FLIP_PARTNER);
    }
    if (need) dm_store_pixels<O, NHWC, VEC>(S, N, row, x0, DmFromGathered{qa, S.b, off, wself});
    else dm_store_pixels<O, NHWC, VEC>(S, N, row, x0, DmFromA{qa});
    return;
  }
  if (K != DMK_NONE) {
    float wself[DM_PIX];  // weight of the sample's own image per pixel
    bool need = K == DMK_BLEND;
    if (K == DMK_BLEND) {
DM_UNROLL
      for (int k = 0; k < DM_PIX; ++k) wself[k] = R.lam;
    } else if (K == DMK_BOX) {
      const bool rows = y >= R.y0 && y < R.y1;
DM_UNROLL
      for (int k = 0; k < DM_PIX; ++k) {
        const int x = x0 + k;
        const bool in = rows && x >= R.x0 && x < R.x1;
        wself[k] = in ? 0.f : 1.f;
        need |= in;
      }
    } else if (K == DMK_GRID) {
      // holes of p2 x p3 every p0 x p1 pixels from the box corner, clipped to the box
      const bool rows = y >= R.y0 && y < R.y1 && (unsigned int)(y - R.y0) % (unsigned int)R.p1 < (unsigned int)R.p3;
DM_UNROLL
      for (int k = 0; k < DM_PIX; ++k) {
        const int x = x0 + k;
        const bool in = rows && x >= R.x0 && x < R.x1 &&
                        (unsigned int)(x - R.x0) % (unsigned int)R.p0 < (unsigned int)R.p2;
        wself[k] = in ? 0.f : 1.f;
        need |= in;
      }
    } else if (K == DMK_SMOOTH) {
      // 1 - g, g a Gaussian blob on a grid of period 2H x 2W centred on (H - 1/2, W - 1/2), shifted by (p0, p1)
      const int py = 2 * h, px = 2 * w;
      int vy = (y + R.p0) % py;
      if (vy < 0) vy += py;
      const float dy = (float)vy - 0.5f * (float)(py - 1);
DM_UNROLL
      for (int k = 0; k < DM_PIX; ++k) {
        int vx = (x0 + k + R.p1) % px;
        if (vx < 0) vx += px;
        const float dx = (float)vx - 0.5f * (float)(px - 1);
        wself[k] = 1.f - expf(-(dy * dy + dx * dx) * R.f0);
      }
      need = true;
    } else {  // DMK_MASK_*: the low-res mask upsampled (F.interpolate's rules), then the sigmoid for logits
      const int mh = R.mask_h, mw = R.mask_w;
      if (K == DMK_MASK_BILINEAR || K == DMK_MASK_BILINEAR_SIGMOID) {
        int my0, my1;
        float wy;
        dm_linear_coord(y, mh, h, &my0, &my1, &wy);
        const float* r0 = S.mask + (unsigned int)my0 * (unsigned int)mw;
        const float* r1 = S.mask + (unsigned int)my1 * (unsigned int)mw;
DM_UNROLL
        for (int k = 0; k < DM_PIX; ++k) {
          const int x = x0 + k < w ? x0 + k : w - 1;
          int mx0, mx1;
          float wx;
          dm_linear_coord(x, mw, w, &mx0, &mx1, &wx);
          wself[k] = (1.f - wy) * ((1.f - wx) * r0[mx0] + wx * r0[mx1]) + wy * ((1.f - wx) * r1[mx0] + wx * r1[mx1]);
        }
      } else {
        const float* r0 = S.mask + (unsigned int)dm_nearest_index(y, mh, h) * (unsigned int)mw;
DM_UNROLL
        for (int k = 0; k < DM_PIX; ++k) {
          const int x = x0 + k < w ? x0 + k : w - 1;
          wself[k] = r0[dm_nearest_index(x, mw, w)];
        }
      }
      if (K == DMK_MASK_NEAREST_SIGMOID || K == DMK_MASK_BILINEAR_SIGMOID) {
DM_UNROLL
        for (int k = 0; k < DM_PIX; ++k) wself[k] = 1.f / (1.f + expf(-wself[k]));
      }
DM_UNROLL
      for (int k = 0; k < DM_PIX; ++k) need |= wself[k] != 1.f;
    }
    if (need) {
      unsigned int qb[3];
      dm_load_pixels<VEC>(S.b, row, x0, w, (R.flags & DM_FLAG_FLIP_PARTNER) != 0, qb);
      dm_store_pixels<O, NHWC, VEC>(S, N, row, x0, DmFromMix{qa, qb, wself});
      return;
    }
  }
  dm_store_pixels<O, NHWC, VEC>(S, N, row, x0, DmFromA{qa});
}

// Rows y0, y0 + ystep, ... and, in each, column groups g0, g0 + gstep, ... of one sample (the
// launch makes one pass of groups cover a row, so a thread walks down the rows; the host backend
// calls it once per row).
template <class O, bool NHWC, int K, bool VEC>
__device__ __host__ __forceinline__ void dm_columns(const DmRecord& R, const DmSample<O>& S, const DmNorm& N, int g0,
                                                    int gstep, int y0, int ystep) {
  const int groups = (S.w + DM_PIX - 1) / DM_PIX;
  DM_NO_UNROLL
  for (int y = y0; y < S.h; y += ystep) {
    DM_NO_UNROLL
    for (int g = g0; g < groups; g += gstep) dm_group<O, NHWC, K, VEC>(R, S, N, y, g * DM_PIX);
  }
}

// The loop variant of a record.
__device__ __host__ __forceinline__ int dm_kind(const DmRecord& R) {
  const bool bilinear = (R.flags & DM_FLAG_BILINEAR) != 0;
  switch (R.method) {
    case DM_METHOD_BLEND: return R.lam == 1.f ? DMK_NONE : DMK_BLEND;
    case DM_METHOD_BOX: return DMK_BOX;
    case DM_METHOD_MASK:
      // (validate_records refuses DM_FLAG_GATHER_SELF with DM_FLAG_BILINEAR)
      if ((R.flags & DM_FLAG_GATHER) && (R.flags & DM_FLAG_GATHER_SELF)) return DMK_MASK_NEAREST_GATHER_SELF;
      if (R.flags & DM_FLAG_GATHER) return bilinear ? DMK_MASK_BILINEAR_GATHER : DMK_MASK_NEAREST_GATHER;
      if (R.flags & DM_FLAG_SIGMOID) return bilinear ? DMK_MASK_BILINEAR_SIGMOID : DMK_MASK_NEAREST_SIGMOID;
      return bilinear ? DMK_MASK_BILINEAR : DMK_MASK_NEAREST;
    case DM_METHOD_RESIZE: return bilinear ? DMK_RESIZE_BILINEAR : DMK_RESIZE_NEAREST;
    case DM_METHOD_GRID: return DMK_GRID;
    case DM_METHOD_SMOOTH: return DMK_SMOOTH;
    default: return DMK_NONE;
  }
}

// Sample s's buffers (the only 64-bit offsets).
template <class O>
__device__ __host__ __forceinline__ DmSample<O> dm_sample(const unsigned char* src, const DmRecord& R,
                                                          const float* masks, const int* gather,
                                                          typename O::T* dst, int s, int h, int w) {
  DmSample<O> S;
  S.h = h;
  S.w = w;
  S.plane = (unsigned int)h * (unsigned int)w;
  const dm_i64 pixels = (dm_i64)S.plane * 3;
  S.a = src + (dm_i64)s * pixels;
  S.b = src + (dm_i64)R.partner * pixels;
  S.mask = masks + R.mask_offset;
  S.gather = gather + ((R.flags & DM_FLAG_GATHER) ? R.p0 : 0);
  S.gather_self = gather + ((R.flags & DM_FLAG_GATHER) && (R.flags & DM_FLAG_GATHER_SELF) ? R.p3 : 0);
  S.out = dst + (dm_i64)s * pixels;
  return S;
}

// One sample through loop variant K: its record loaded once, its columns and rows walked.
template <class O, bool NHWC, int K, bool VEC>
__device__ __host__ __forceinline__ void dm_sample_loop(const unsigned char* __restrict__ src,
                                                    const DmRecord* __restrict__ rec, const float* __restrict__ masks,
                                                    const int* __restrict__ gather, typename O::T* __restrict__ dst, int s, int h, int w, DmNorm N,
                                                    int g0, int gstep, int y0, int ystep) {
  DmRecord R = rec[s];
#ifdef DM_SASS_FLAGS
  R.flags = DM_SASS_FLAGS;
#endif
  const DmSample<O> S = dm_sample<O>(src, R, masks, gather, dst, s, h, w);
  dm_columns<O, NHWC, K, VEC>(R, S, N, g0, gstep, y0, ystep);
}

#define DM_VARIANT(K) dm_sample_loop<O, NHWC, K, VEC>(src, rec, masks, gather, dst, s, h, w, N, g0, gstep, y0, ystep)

template <class O, bool NHWC, bool VEC>
__device__ __host__ __forceinline__ void dm_dispatch(int kind, const unsigned char* __restrict__ src,
                                                     const DmRecord* __restrict__ rec, const float* __restrict__ masks,
                                                     const int* __restrict__ gather, typename O::T* __restrict__ dst,
                                                     int s, int h, int w,
                                                     const DmNorm& N, int g0, int gstep, int y0, int ystep) {
#ifdef DM_SASS_KIND  // benchmarks/bench_mix.py: one loop variant per build, to count its instructions
  (void)kind;
  DM_VARIANT(DM_SASS_KIND);
#else
  switch (kind) {
    case DMK_BLEND: DM_VARIANT(DMK_BLEND); break;
    case DMK_BOX: DM_VARIANT(DMK_BOX); break;
    case DMK_MASK_NEAREST: DM_VARIANT(DMK_MASK_NEAREST); break;
    case DMK_MASK_BILINEAR: DM_VARIANT(DMK_MASK_BILINEAR); break;
    case DMK_MASK_NEAREST_SIGMOID: DM_VARIANT(DMK_MASK_NEAREST_SIGMOID); break;
    case DMK_MASK_BILINEAR_SIGMOID: DM_VARIANT(DMK_MASK_BILINEAR_SIGMOID); break;
    case DMK_RESIZE_NEAREST: DM_VARIANT(DMK_RESIZE_NEAREST); break;
    case DMK_RESIZE_BILINEAR: DM_VARIANT(DMK_RESIZE_BILINEAR); break;
    case DMK_GRID: DM_VARIANT(DMK_GRID); break;
    case DMK_SMOOTH: DM_VARIANT(DMK_SMOOTH); break;
    case DMK_MASK_NEAREST_GATHER: DM_VARIANT(DMK_MASK_NEAREST_GATHER); break;
    case DMK_MASK_BILINEAR_GATHER: DM_VARIANT(DMK_MASK_BILINEAR_GATHER); break;
    case DMK_MASK_NEAREST_GATHER_SELF: DM_VARIANT(DMK_MASK_NEAREST_GATHER_SELF); break;
    default: DM_VARIANT(DMK_NONE); break;
  }
#endif
}
#undef DM_VARIANT

// Fill value of channel c of element e = (y * W + x) * 3 + c in box b of table row t.
__device__ __host__ __forceinline__ float dm_erase_fill(const int* t, int mode, unsigned int box_key, int b,
                                                        unsigned int e, int c) {
  if (mode == DM_ERASE_PIXEL) return dm_erase_normal(box_key, e);
  if (mode == DM_ERASE_RAND) return dm_bits_float((unsigned int)t[DM_ERASE_COLORS + 3 * b + c]);
  return 0.f;
}

// The box of table row t (count boxes) on top at pixel (y, x): the last one covering it, or -1.
__device__ __host__ __forceinline__ int dm_erase_top(const int* t, int count, int y, int x) {
  DM_NO_UNROLL
  for (int b = count - 1; b >= 0; --b) {
    const int* q = t + DM_ERASE_BOXES + 4 * b;
    if (y >= q[0] && y < q[2] && x >= q[1] && x < q[3]) return b;
  }
  return -1;
}

// Erase pixel (y, x) of sample output `out` (3 x H x W, or H x W x 3) with box b of table row t.
template <class O, bool NHWC>
__device__ __host__ __forceinline__ void dm_erase_pixel(const int* t, int b, typename O::T* out, int y, int x, int w,
                                                        unsigned int plane) {
  const unsigned int r = (unsigned int)y * (unsigned int)w + (unsigned int)x;
  const int mode = t[1];
  const unsigned int bk = mode == DM_ERASE_PIXEL ? dm_erase_box_key((unsigned int)t[2], b) : 0u;
DM_UNROLL
  for (int c = 0; c < 3; ++c) {
    const typename O::T v = O::cvt(dm_erase_fill(t, mode, bk, b, r * 3u + (unsigned int)c, c));
    if (NHWC) out[r * 3u + (unsigned int)c] = v;
    else out[(unsigned int)c * plane + r] = v;
  }
}

// The erasing of sample s by the thread that wrote groups g0, g0 + gstep, ... of rows y0, y0 +
// ystep, ...: per row, the columns [lo, hi) its boxes cover; per group inside them, each pixel
// gets the fill of the box on top there. Pixels outside every box are not touched.
template <class O, bool NHWC>
__device__ __host__ __forceinline__ void dm_erase_sample(const int* __restrict__ t, typename O::T* __restrict__ out,
                                                         int h, int w, int g0, int gstep, int y0, int ystep) {
  const int count = t[0];
  const unsigned int plane = (unsigned int)h * (unsigned int)w;
  DM_NO_UNROLL
  for (int y = y0; y < h; y += ystep) {
    int lo = w, hi = 0;
    DM_NO_UNROLL
    for (int b = 0; b < count; ++b) {
      const int* q = t + DM_ERASE_BOXES + 4 * b;
      if (y >= q[0] && y < q[2] && q[1] < q[3]) {
        lo = q[1] < lo ? q[1] : lo;
        hi = q[3] > hi ? q[3] : hi;
      }
    }
    if (lo >= hi) continue;
    // the thread's groups that meet [lo, hi): g * DM_PIX + DM_PIX > lo and g * DM_PIX < hi
    int g = g0;
    const int first = lo / DM_PIX;
    if (g < first) g += (first - g + gstep - 1) / gstep * gstep;
    DM_NO_UNROLL
    for (; g * DM_PIX < hi; g += gstep) {
      const int xa = g * DM_PIX > lo ? g * DM_PIX : lo;
      const int xb = g * DM_PIX + DM_PIX < hi ? g * DM_PIX + DM_PIX : hi;
      DM_NO_UNROLL
      for (int x = xa; x < xb; ++x) {
        const int b = dm_erase_top(t, count, y, x);
        if (b >= 0) dm_erase_pixel<O, NHWC>(t, b, out, y, x, w, plane);
      }
    }
  }
}

// The vector path needs whole groups (W % 4 == 0) and aligned buffers.
__device__ __host__ __forceinline__ bool dm_vector_ok(const void* src, const void* dst, int w) {
  return (w % DM_PIX) == 0 && ((((unsigned long long)src) | ((unsigned long long)dst)) & 15u) == 0;
}

// The CUDA kernel: samples on z, row groups on y, column groups on x, grid-stride in all three.
template <class O, bool NHWC>
__device__ __forceinline__ void dm_mix_normalize(const unsigned char* __restrict__ src,
                                                 const DmRecord* __restrict__ rec,
                                                 const float* __restrict__ masks,
                                                 const int* __restrict__ gather,
                                                 typename O::T* __restrict__ dst, int n, int h,
                                                 int w, float m0, float m1, float m2, float s0,
                                                 float s1, float s2, const int* __restrict__ erase) {
  const DmNorm N = {m0, m1, m2, s0, s1, s2, -m0 * s0, -m1 * s1, -m2 * s2};
  const bool vec = dm_vector_ok(src, dst, w);
  const int g0 = (int)(blockIdx.x * blockDim.x + threadIdx.x), gstep = (int)(gridDim.x * blockDim.x);
  const int y0 = (int)(blockIdx.y * blockDim.y + threadIdx.y), ystep = (int)(gridDim.y * blockDim.y);
  for (int s = (int)blockIdx.z; s < n; s += (int)gridDim.z) {
    const int kind = dm_kind(rec[s]);
#ifndef DM_SASS_ERASE  // benchmarks/bench_mix.py counts the erasing loop alone
    if (vec) dm_dispatch<O, NHWC, true>(kind, src, rec, masks, gather, dst, s, h, w, N, g0, gstep, y0, ystep);
    else dm_dispatch<O, NHWC, false>(kind, src, rec, masks, gather, dst, s, h, w, N, g0, gstep, y0, ystep);
#else
    (void)kind;
    (void)vec;
#endif
  }
  // erasing after the thread's mixing loop (nothing of it stays live there): once per sample, the
  // table's count; nothing more when the sample has no boxes
  if (erase) {
    for (int s = (int)blockIdx.z; s < n; s += (int)gridDim.z) {
      const int* t = erase + (unsigned int)s * DM_ERASE_STRIDE;
      if (t[0] > 0) dm_erase_sample<O, NHWC>(t, dst + (dm_i64)s * ((dm_i64)h * w * 3), h, w, g0, gstep, y0, ystep);
    }
  }
}

#define DM_MIX_NORMALIZE_ENTRY(NAME, OUT, NHWC)                                                   \
  extern "C" __global__ void DM_LAUNCH_BOUNDS NAME(const unsigned char* src, const DmRecord* rec,                  \
                                  const float* masks, const int* gather, OUT::T* dst, int n, int h, \
                                  int w, float m0, float m1, float m2, float s0, float s1, float s2, \
                                  const int* erase) {                                             \
    dm_mix_normalize<OUT, NHWC>(src, rec, masks, gather, dst, n, h, w, m0, m1, m2, s0, s1, s2, erase); \
  }

// DM_ENTRY_MASK (bit i = the i-th entry below, the order of dalimix.ops.kernels.ENTRIES) compiles a
// subset: the CUDA backend builds only the entry it launches (NVRTC time is per entry).
#ifndef DM_ENTRY_MASK
#define DM_ENTRY_MASK 63
#endif
#if DM_ENTRY_MASK & 1
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f32_nchw, DmOutF32, false)
#endif
#if DM_ENTRY_MASK & 2
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f32_nhwc, DmOutF32, true)
#endif
#if DM_ENTRY_MASK & 4
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f16_nchw, DmOutF16, false)
#endif
#if DM_ENTRY_MASK & 8
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_f16_nhwc, DmOutF16, true)
#endif
#if DM_ENTRY_MASK & 16
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_bf16_nchw, DmOutBF16, false)
#endif
#if DM_ENTRY_MASK & 32
DM_MIX_NORMALIZE_ENTRY(dalimix_mix_normalize_bf16_nhwc, DmOutBF16, true)
#endif
