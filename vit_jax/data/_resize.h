/* The fused resize kernel (_resize.c), called by the op wrappers _resize_op.cc and _jpeg_op.cc. */
#ifndef VIT_JAX_DATA_RESIZE_H_
#define VIT_JAX_DATA_RESIZE_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* See _resize.c. Returns 0, or -1 (window needs pixels outside src), -2 (bad sizes), -3 (OOM). */
int vj_resize_bilinear_u8(const uint8_t *src, int64_t src_h, int64_t src_w, int64_t src_stride,
                          int64_t src_y, int64_t src_x, int64_t in_h, int64_t in_w,
                          int64_t out_h, int64_t out_w, int64_t win_y, int64_t win_x,
                          int64_t win_h, int64_t win_w, int flip, float mul, float add,
                          float *dst);
void vj_resize_region(int64_t src_h, int64_t src_w, const int64_t crop[4], int64_t out_h,
                      int64_t out_w, const int64_t win[4], int64_t margin, int64_t box[4]);

#ifdef __cplusplus
}
#endif

#endif /* VIT_JAX_DATA_RESIZE_H_ */
