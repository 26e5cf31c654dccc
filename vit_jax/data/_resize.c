/* Bilinear resize of a uint8 RGB crop with a window, flip and affine fused, for the input pipeline.

   One pass from the decoded uint8 pixels to the float32 output that tf.data batches, replacing
   TensorFlow's cast -> ResizeBilinear(half_pixel_centers) -> slice -> reverse -> multiply -> add
   (six ops, five passes over memory). The sampling grid is TensorFlow's: output index i maps to
   source coordinate (i + 0.5) * in / out - 0.5, neighbours clamped at the edges, so the result
   equals TensorFlow's to float32 rounding. Interpolation is vertical first: a contiguous lerp of
   two source rows (vectorised), then one horizontal lerp per output value, each a fused
   multiply-add (fmaf), which every path computes alike, so results do not depend on the SIMD;
   the affine comes last, unfused, as TensorFlow's multiply and add compute it.

   Wrapped as a TensorFlow op by _resize_op.cc; both are compiled on first use by fast_resize.py.
   -ffp-contract=off keeps the compiler from fusing anything else. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "_resize.h"

typedef struct {
  int64_t lo, hi;
  float lerp;
} Tap;

/* Taps for `count` outputs starting at output index `start`, of an in_size -> out_size resize. */
static void taps(int64_t in_size, int64_t out_size, int64_t start, int64_t count, Tap *t) {
  const float scale = (float)in_size / (float)out_size;
  for (int64_t i = 0; i < count; ++i) {
    const float in = ((float)(start + i) + 0.5f) * scale - 0.5f;
    const float f = floorf(in);
    int64_t lo = (int64_t)f, hi = (int64_t)ceilf(in);
    t[i].lo = lo < 0 ? 0 : lo;
    t[i].hi = hi > in_size - 1 ? in_size - 1 : hi;
    t[i].lerp = in - f;
  }
}

/* Vertical pass: row[k] = (bot[k] - top[k]) * yl + top[k] over n values, the multiply-add fused
   (fmaf): one rounding, the same on every path, scalar or SIMD. */
static void vpass(const uint8_t *top, const uint8_t *bot, int64_t n, float yl, float *row) {
  for (int64_t k = 0; k < n; ++k) {
    const float a = (float)top[k];
    row[k] = fmaf((float)bot[k] - a, yl, a);
  }
}

/* Horizontal pass: v = (row[hi[j]..+2] - row[lo[j]..+2]) * x[j] + row[lo[j]..+2] (fused), then
   out = v * mul + add, unfused as in value_range: a 255 maps to exactly 1.0 for (-1, 1). */
static void hpass(const float *row, const int32_t *lo, const int32_t *hi, const float *w4,
                  int64_t w, float mul, float add, float *out) {
  for (int64_t j = 0; j < w; ++j) {
    const float *l = row + lo[j], *h = row + hi[j], x = w4[4 * j];
    for (int c = 0; c < 3; ++c) out[3 * j + c] = fmaf(h[c] - l[c], x, l[c]) * mul + add;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(VJ_NO_SIMD)  /* VJ_NO_SIMD: tests. */
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
/* The same passes with AVX2 and FMA: the same operations in the same order, so the same results.
   The horizontal one does two pixels per register: 4-lane loads read one float past a pixel (the
   row has padding) and each 4-lane store writes one float into the next pixel, rewritten by it,
   so the last pixel is done by the scalar code. */
__attribute__((target("avx2,fma"))) static void vpass_avx2(const uint8_t *top,
                                                            const uint8_t *bot, int64_t n,
                                                            float yl, float *row) {
  const __m256 y = _mm256_set1_ps(yl);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(top + k))));
    const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(bot + k))));
    _mm256_storeu_ps(row + k, _mm256_fmadd_ps(_mm256_sub_ps(b, a), y, a));
  }
  vpass(top + k, bot + k, n - k, yl, row + k);
}

__attribute__((target("avx2,fma"))) static void hpass_avx2(const float *row, const int32_t *lo,
                                                            const int32_t *hi, const float *w4,
                                                            int64_t w, float mul, float add,
                                                            float *out) {
  const __m256 m = _mm256_set1_ps(mul), c = _mm256_set1_ps(add);
  int64_t j = 0;
  for (; j + 2 < w; j += 2) {
    const __m256 l = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(row + lo[j])),
                                          _mm_loadu_ps(row + lo[j + 1]), 1);
    const __m256 h = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(row + hi[j])),
                                          _mm_loadu_ps(row + hi[j + 1]), 1);
    const __m256 v = _mm256_fmadd_ps(_mm256_sub_ps(h, l), _mm256_load_ps(w4 + 4 * j), l);
    const __m256 o = _mm256_add_ps(_mm256_mul_ps(v, m), c);
    _mm_storeu_ps(out + 3 * j, _mm256_castps256_ps128(o));
    _mm_storeu_ps(out + 3 * j + 3, _mm256_extractf128_ps(o, 1));
  }
  hpass(row, lo + j, hi + j, w4 + 4 * j, w - j, mul, add, out + 3 * j);
}
#endif

/* Resizes the crop [in_h, in_w, 3] to [out_h, out_w, 3] and writes the window
   [win_y : win_y + win_h, win_x : win_x + win_w] of the result to dst (float32, contiguous),
   mirrored left-right if `flip`, as value * mul + add.

   Only part of the crop needs to be decoded: `src` holds crop rows [src_y, src_y + src_h) and
   columns [src_x, src_x + src_w), row stride src_stride bytes. Returns 0, or -1 if the window
   needs pixels outside `src`, -2 on bad sizes, -3 if out of memory. */
int vj_resize_bilinear_u8(const uint8_t *src, int64_t src_h, int64_t src_w, int64_t src_stride,
                          int64_t src_y, int64_t src_x, int64_t in_h, int64_t in_w, int64_t out_h,
                          int64_t out_w, int64_t win_y, int64_t win_x, int64_t win_h, int64_t win_w,
                          int flip, float mul, float add, float *dst) {
  if (in_h <= 0 || in_w <= 0 || out_h <= 0 || out_w <= 0 || win_h <= 0 || win_w <= 0 ||
      win_y < 0 || win_x < 0 || win_y + win_h > out_h || win_x + win_w > out_w || src_h <= 0 ||
      src_w <= 0 || win_w > (1 << 28))
    return -2;
  Tap *ys = malloc(sizeof(Tap) * (size_t)win_h);
  Tap *xs = malloc(sizeof(Tap) * (size_t)win_w);
  int32_t *lo = malloc(sizeof(int32_t) * (size_t)win_w), *hi = malloc(sizeof(int32_t) * (size_t)win_w);
  /* aligned_alloc wants a multiple of the alignment (macOS returns NULL otherwise). */
  float *w4 = aligned_alloc(32, sizeof(float) * 8 * (size_t)(win_w / 2 + 1));
  float *row = NULL;
  int rc = 0;
  if (!ys || !xs || !lo || !hi || !w4) {
    rc = -3;
    goto done;
  }
  taps(in_h, out_h, win_y, win_h, ys);
  taps(in_w, out_w, win_x, win_w, xs);
  /* Columns of src that the window reads; a flip reverses the order in which they are written. */
  int64_t c0 = xs[0].lo, c1 = xs[win_w - 1].hi;
  if (ys[0].lo < src_y || ys[win_h - 1].hi >= src_y + src_h || c0 < src_x ||
      c1 >= src_x + src_w || 3 * (c1 - c0 + 1) > INT32_MAX - 8) {
    rc = -1;
    goto done;
  }
  for (int64_t j = 0; j < win_w; ++j) {
    const Tap *t = &xs[flip ? win_w - 1 - j : j];
    lo[j] = (int32_t)(3 * (t->lo - c0));
    hi[j] = (int32_t)(3 * (t->hi - c0));
    w4[4 * j] = w4[4 * j + 1] = w4[4 * j + 2] = w4[4 * j + 3] = t->lerp;
  }
  const int64_t n = 3 * (c1 - c0 + 1);
  row = malloc(sizeof(float) * (size_t)(n + 8)); /* Padding for 4-lane loads of the last pixel. */
  if (!row) {
    rc = -3;
    goto done;
  }
#ifdef HAVE_AVX2_PATH
  const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  for (int64_t i = 0; i < win_h; ++i) {
    const uint8_t *top = src + (ys[i].lo - src_y) * src_stride + 3 * (c0 - src_x);
    const uint8_t *bot = src + (ys[i].hi - src_y) * src_stride + 3 * (c0 - src_x);
    float *out = dst + i * win_w * 3;
#ifdef HAVE_AVX2_PATH
    if (avx2) {
      vpass_avx2(top, bot, n, ys[i].lerp, row);
      hpass_avx2(row, lo, hi, w4, win_w, mul, add, out);
      continue;
    }
#endif
    vpass(top, bot, n, ys[i].lerp, row);
    hpass(row, lo, hi, w4, win_w, mul, add, out);
  }
done:
  free(ys);
  free(xs);
  free(lo);
  free(hi);
  free(w4);
  free(row);
  return rc;
}

/* The box (y, x, h, w, in source pixels) to decode so that the window of the resized crop can be
   computed: the source rows and columns its taps read, widened by `margin` pixels (clamped to
   the source image). The taps come from the same arithmetic as above, so nothing is missed. */
void vj_resize_region(int64_t src_h, int64_t src_w, const int64_t crop[4], int64_t out_h,
                      int64_t out_w, const int64_t win[4], int64_t margin, int64_t box[4]) {
  Tap t[2];
  int64_t lo[2], hi[2];
  const int64_t in[2] = {crop[2], crop[3]}, out[2] = {out_h, out_w}, size[2] = {src_h, src_w};
  for (int d = 0; d < 2; ++d) {
    taps(in[d], out[d], win[d], 1, &t[0]);
    taps(in[d], out[d], win[d] + win[d + 2] - 1, 1, &t[1]);
    lo[d] = crop[d] + t[0].lo - margin;
    hi[d] = crop[d] + t[1].hi + margin;
    if (lo[d] < 0) lo[d] = 0;
    if (hi[d] > size[d] - 1) hi[d] = size[d] - 1;
    if (hi[d] < lo[d]) hi[d] = lo[d];
  }
  box[0] = lo[0];
  box[1] = lo[1];
  box[2] = hi[0] - lo[0] + 1;
  box[3] = hi[1] - lo[1] + 1;
}
