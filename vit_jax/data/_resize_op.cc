// TensorFlow op VitJaxResizeWindow around vj_resize_bilinear_u8 (_resize.c): no Python, no GIL,
// the output allocated by TensorFlow and written once. Compiled on first use by fast_resize.py.
#include <cstdint>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

extern "C" int vj_resize_bilinear_u8(const uint8_t *src, int64_t src_h, int64_t src_w,
                                     int64_t src_stride, int64_t src_y, int64_t src_x,
                                     int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                                     int64_t win_y, int64_t win_x, int64_t win_h, int64_t win_w,
                                     int flip, float mul, float add, float *dst);

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

const char *Reason(int rc) {
  switch (rc) {
    case -1: return "the window needs pixels outside the decoded region";
    case -2: return "bad sizes";
    case -3: return "out of memory";
    default: return "unknown error";
  }
}

// params (int64 [11]): src_y, src_x (position of src in the crop), in_h, in_w (crop size),
// out_h, out_w (resized size), win_y, win_x, win_h, win_w (window of the resized image), flip.
// affine (float [2]): output = value * affine[0] + affine[1].
class VitJaxResizeWindowOp : public OpKernel {
 public:
  explicit VitJaxResizeWindowOp(OpKernelConstruction *c) : OpKernel(c) {}

  void Compute(OpKernelContext *c) override {
    const Tensor &src = c->input(0);
    OP_REQUIRES(c, src.dims() == 3 && src.dim_size(2) == 3,
                absl::InvalidArgumentError("src must be uint8 [h, w, 3], got " +
                                           src.shape().DebugString()));
    const auto p = c->input(1).flat<int64_t>();
    const auto a = c->input(2).flat<float>();
    OP_REQUIRES(c, p.size() == 11 && a.size() == 2,
                absl::InvalidArgumentError("params must have 11 values and affine 2"));
    OP_REQUIRES(c, p(8) > 0 && p(9) > 0, absl::InvalidArgumentError("empty window"));
    Tensor *out = nullptr;
    OP_REQUIRES_OK(c, c->allocate_output(0, TensorShape({p(8), p(9), 3}), &out));
    const int rc = vj_resize_bilinear_u8(
        src.flat<uint8_t>().data(), src.dim_size(0), src.dim_size(1), src.dim_size(1) * 3, p(0),
        p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), static_cast<int>(p(10)), a(0), a(1),
        out->flat<float>().data());
    OP_REQUIRES(c, rc == 0,
                absl::InvalidArgumentError(absl::StrCat(
                    "VitJaxResizeWindow: ", Reason(rc), "; src ", src.shape().DebugString(),
                    " at (", p(0), ", ", p(1), ") of a ", p(2), "x", p(3), " crop resized to ",
                    p(4), "x", p(5), ", window ", p(8), "x", p(9), " at (", p(6), ", ", p(7),
                    ")")));
  }
};

}  // namespace

REGISTER_OP("VitJaxResizeWindow")
    .Input("src: uint8")
    .Input("params: int64")
    .Input("affine: float")
    .Output("out: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext *c) {
      c->set_output(0, c->MakeShape({c->UnknownDim(), c->UnknownDim(), 3}));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("VitJaxResizeWindow").Device(::tensorflow::DEVICE_CPU),
                        VitJaxResizeWindowOp);
