// Shared definitions for dalimix kernels.
//
// Everything here compiles three ways: NVRTC at run time (through CuPy), nvcc for the
// offline register/spill check, and g++ through the host shim used by the tests. So: no
// standard headers, no CUDA headers, no shared memory, no barriers.
#pragma once

typedef long long dm_i64;

// ---------------------------------------------------------------------------------------------
// Per-sample parameter record. One per output sample, 64 bytes, every field 4 bytes wide so the
// layout is the same on host and device. Mirrored by dalimix.ops.record.RECORD_DTYPE.
// ---------------------------------------------------------------------------------------------
#define DM_METHOD_NONE 0    // out = a
#define DM_METHOD_BLEND 1   // out = lam * a + (1 - lam) * b                  (MixUp, SamplePairing)
#define DM_METHOD_BOX 2     // out = b inside the box, a outside               (CutMix)
#define DM_METHOD_MASK 3    // out = m * a + (1 - m) * b, m upsampled from a low-res mask
#define DM_METHOD_RESIZE 4  // out = whole b resized into the box, a outside   (ResizeMix)
#define DM_METHOD_GRID 5    // out = b in a grid of holes inside the box, a elsewhere (GridMix)
#define DM_METHOD_SMOOTH 6  // out = g * b + (1 - g) * a, g a Gaussian blob    (SmoothMix)

#define DM_FLAG_BILINEAR 1  // mask / resize sampling: bilinear (align_corners=False) instead of nearest
#define DM_FLAG_SIGMOID 2   // mask holds logits: the sigmoid is applied after upsampling
#define DM_FLAG_FLIP_SELF 4     // read the sample's own image a mirrored left-right (column w-1-x)
#define DM_FLAG_FLIP_PARTNER 8  // read the partner image b mirrored left-right; boxes/masks stay in
                                // output coordinates: the result is "flip each image, then mix"
#define DM_FLAG_GATHER 16   // MASK: the partner is read block-permuted (PuzzleMix's transport): p0 = offset
                            // of the sample's table in `gather`, p1 x p2 = block grid gh x gw; see
                            // dm_gather_coord
#define DM_FLAG_GATHER_SELF 32  // with DM_FLAG_GATHER: the own image is read block-permuted too, on the same
                                // grid, its permutation at gather[p3 ...] (PuzzleMix transports both inputs)

struct DmRecord {
  int partner;      // batch index of the partner image b
  int method;       // DM_METHOD_*
  float lam;        // weight of the sample's own image for DM_METHOD_BLEND
  int flags;        // DM_FLAG_*
  int y0, x0;       // box [y0, y1) x [x0, x1) where the partner shows (BOX, RESIZE)
  int y1, x1;
  int mask_offset;  // first element of this sample's mask in the mask pool (MASK)
  int mask_h;       // mask height and width (MASK)
  int mask_w;
  // GRID:   p0, p1 = patch width, height; p2, p3 = hole width, height (holes start at the box corner)
  // SMOOTH: p0, p1 = y, x offsets of the periodic grid (period 2H, 2W); f0 = 1 / (2 sigma^2)
  // MASK + DM_FLAG_GATHER: p0 = offset of the block permutation in `gather`, p1, p2 = grid gh, gw;
  //   + DM_FLAG_GATHER_SELF: p3 = offset of the own image's permutation (same grid)
  int p0, p1, p2, p3;
  float f0;
};

// ---------------------------------------------------------------------------------------------
// Per-sample erase table (random erasing, fused into the kernel's pass): one row of DM_ERASE_STRIDE
// int32 per output sample, mirrored by dalimix.ops.record (ERASE_*). A null table, or count 0, means
// no erasing. Fill values are in normalised space (the final output), written over the mixed pixel.
//   [0] count: boxes 0..count-1 are read (a box with y0 == y1 or x0 == x1 covers nothing)
//   [1] mode: DM_ERASE_CONST (0), DM_ERASE_RAND (one colour per box and channel), DM_ERASE_PIXEL
//   [2] noise key of the sample (uint32 bits, from the plan's seed and the sample's index)
//   [4 + 4b ...] box b: y0, x0, y1, x1 (rows [y0, y1), columns [x0, x1), output coordinates)
//   [DM_ERASE_COLORS + 3b + c] box b's colour for channel c (float32 bits, mode RAND)
// Later boxes cover earlier ones (timm's drawing order).
// ---------------------------------------------------------------------------------------------
#define DM_ERASE_MAX_BOXES 8
#define DM_ERASE_STRIDE 64
#define DM_ERASE_BOXES 4
#define DM_ERASE_COLORS 36  // DM_ERASE_BOXES + 4 * DM_ERASE_MAX_BOXES
#define DM_ERASE_CONST 0
#define DM_ERASE_RAND 1
#define DM_ERASE_PIXEL 2

// A 32-bit integer hash (xor-shift / multiply rounds, full avalanche): the counter-based RNG of
// the erase noise. Mirrored in numpy by dalimix.ops.record.hash32 and in torch by dalimix.ops.cpu.
__device__ __host__ __forceinline__ unsigned int dm_hash32(unsigned int x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The key of box b of a sample (from the sample's noise key, table entry [2]).
__device__ __host__ __forceinline__ unsigned int dm_erase_box_key(unsigned int sample_key, int b) {
  return dm_hash32(sample_key ^ (unsigned int)b);
}

// cos(2 pi u) for u in [0, 1): exact reductions to [0, 1/4] (1 - u and 1/2 - u are exact there),
// then the Taylor polynomial of cos to x^12 (error < 1e-8 on [0, pi/2]) with fmaf, so host and
// device compute the same bits (cosf would bring a local-memory argument reduction into the kernel).
__device__ __host__ __forceinline__ float dm_cos_2pi(float u) {
  float t = u < 0.5f ? u : 1.f - u;
  const float sign = t <= 0.25f ? 1.f : -1.f;
  t = t <= 0.25f ? t : 0.5f - t;
  const float x = 6.28318530717958647692f * t;
  const float x2 = x * x;
  float p = 2.08767570e-09f;      // 1/12!
  p = fmaf(p, x2, -2.75573192e-07f);  // -1/10!
  p = fmaf(p, x2, 2.48015873e-05f);   // 1/8!
  p = fmaf(p, x2, -1.38888889e-03f);  // -1/6!
  p = fmaf(p, x2, 4.16666667e-02f);   // 1/4!
  p = fmaf(p, x2, -0.5f);
  p = fmaf(p, x2, 1.f);
  return sign * p;
}

// Normal(0, 1) noise of element e = (y * W + x) * 3 + c under a box key: two uniforms from the hash
// (u1 in (0, 1], u2 in [0, 1), 24 bits each), Box-Muller's cosine branch, float32.
__device__ __host__ __forceinline__ float dm_erase_normal(unsigned int box_key, unsigned int e) {
  const unsigned int r1 = dm_hash32(dm_hash32(e) ^ box_key);
  const unsigned int r2 = dm_hash32(r1 ^ 0x9e3779b9u);
  const float u1 = (float)((r1 >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
  const float u2 = (float)(r2 >> 8) * 5.9604644775390625e-08f;
  return sqrtf(-2.f * logf(u1)) * dm_cos_2pi(u2);
}

// ---------------------------------------------------------------------------------------------
// Bit casts and float -> half / bfloat16 conversion (round to nearest even), the same code on
// host and device so the host shim checks exactly what the GPU runs.
// ---------------------------------------------------------------------------------------------
__device__ __host__ __forceinline__ unsigned int dm_float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  union { float f; unsigned int u; } v;
  v.f = f;
  return v.u;
#endif
}

__device__ __host__ __forceinline__ float dm_bits_float(unsigned int u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  union { unsigned int u; float f; } v;
  v.u = u;
  return v.f;
#endif
}

__device__ __host__ __forceinline__ unsigned short dm_f32_to_f16(float f) {
  unsigned int u = dm_float_bits(f);
  unsigned int sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return (unsigned short)(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (u >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to infinity
  if (u < 0x38800000u) {                                          // half subnormal or zero
    if (u < 0x33000000u) return (unsigned short)sign;
    unsigned int e = u >> 23;
    unsigned int m = (u & 0x7fffffu) | 0x800000u;
    unsigned int shift = 126u - e;
    unsigned int r = m >> shift;
    unsigned int rem = m & ((1u << shift) - 1u);
    unsigned int half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (unsigned short)(sign | r);
  }
  unsigned int h = (u >> 13) - 0x1c000u;
  unsigned int rem = u & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
  return (unsigned short)(sign | h);
}

__device__ __host__ __forceinline__ unsigned short dm_f32_to_bf16(float f) {
  unsigned int u = dm_float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

// Output element types. Half and bfloat16 travel as their 16-bit patterns. pack2(lo, hi) converts
// two values into one 32-bit word (lo in the low half, as in memory): on sm_80+ one hardware
// cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32 (round to nearest even, like the software path, which the
// host build and older GPUs keep, bit for bit).
struct DmOutF32 {
  typedef float T;
  enum { kBytes = 4 };
  __device__ __host__ __forceinline__ static T cvt(float v) { return v; }
  __device__ __host__ __forceinline__ static unsigned int pack2(float lo, float) { return dm_float_bits(lo); }  // unused
};
struct DmOutF16 {
  typedef unsigned short T;
  enum { kBytes = 2 };
  __device__ __host__ __forceinline__ static T cvt(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return (T)(pack2(v, 0.f) & 0xffffu);
#else
    return dm_f32_to_f16(v);
#endif
  }
  __device__ __host__ __forceinline__ static unsigned int pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned int)dm_f32_to_f16(lo) | ((unsigned int)dm_f32_to_f16(hi) << 16);
#endif
  }
};
struct DmOutBF16 {
  typedef unsigned short T;
  enum { kBytes = 2 };
  __device__ __host__ __forceinline__ static T cvt(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return (T)(pack2(v, 0.f) & 0xffffu);
#else
    return dm_f32_to_bf16(v);
#endif
  }
  __device__ __host__ __forceinline__ static unsigned int pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned int)dm_f32_to_bf16(lo) | ((unsigned int)dm_f32_to_bf16(hi) << 16);
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// Resampling helpers with PyTorch's F.interpolate index rules (float arithmetic as PyTorch does).
// ---------------------------------------------------------------------------------------------

// mode="nearest": src = min(floor(dst * in / out), in - 1)
__device__ __host__ __forceinline__ int dm_nearest_index(int dst, int in_size, int out_size) {
  float scale = (float)in_size / (float)out_size;
  int s = (int)floorf((float)dst * scale);
  return s < in_size - 1 ? s : in_size - 1;
}

// mode="bilinear", align_corners=False: source coordinate, lower index and upper-neighbour weight.
__device__ __host__ __forceinline__ void dm_linear_coord(int dst, int in_size, int out_size, int* i0,
                                                         int* i1, float* w1) {
  float scale = (float)in_size / (float)out_size;
  float src = scale * ((float)dst + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int lo = (int)src;
  *i0 = lo;
  *i1 = lo + (lo < in_size - 1 ? 1 : 0);
  *w1 = src - (float)lo;
}

// ---------------------------------------------------------------------------------------------
// Block grids (PuzzleMix's transport). g blocks over n pixels: block i is [start(i), start(i+1)),
// start(i) = floor(i * n / g), so blocks differ by at most one pixel when g does not divide n.
// All 32-bit (the records are checked: (n + 1) * g < 2^31).
// ---------------------------------------------------------------------------------------------
__device__ __host__ __forceinline__ int dm_block_start(int i, int n, int g) {
  return (int)(((unsigned int)i * (unsigned int)n) / (unsigned int)g);
}

// The block of pixel p: the largest i with start(i) <= p, i.e. floor(((p + 1) g - 1) / n).
__device__ __host__ __forceinline__ int dm_block_of(int p, int n, int g) {
  return (int)(((unsigned int)(p + 1) * (unsigned int)g - 1u) / (unsigned int)n);
}

// Pixel p lies in block b at offset p - start(b); read from source block sb at the same offset,
// clamped to the source block's last pixel where it is one shorter.
__device__ __host__ __forceinline__ int dm_gather_coord(int p, int b, int sb, int n, int g) {
  const int off = p - dm_block_start(b, n, g);
  const int s0 = dm_block_start(sb, n, g), len = dm_block_start(sb + 1, n, g) - s0;
  return s0 + (off < len ? off : len - 1);
}

// Byte offset in an h x w x 3 image of the pixel that output pixel (y, x), in block (by, bx) of a
// gh x gw grid, reads from source block src (row-major) at the same in-block offset (dm_gather_coord);
// from the mirrored image when flip.
__device__ __host__ __forceinline__ unsigned int dm_gathered_offset(int y, int x, int by, int bx, unsigned int src,
                                                                    int h, int w, int gh, int gw, bool flip) {
  const unsigned int sy = src / (unsigned int)gw;
  const int ry = dm_gather_coord(y, by, (int)sy, h, gh);
  const int rx = dm_gather_coord(x, bx, (int)(src - sy * (unsigned int)gw), w, gw);
  return ((unsigned int)ry * (unsigned int)w + (unsigned int)(flip ? w - 1 - rx : rx)) * 3u;
}
