// TensorFlow ops around _resize.c, compiled on first use by fast_resize.py. All the geometry of a
// lazy crop/resize/window lives here, so a preprocessing function runs two small ops instead of
// dozens of scalar ones (each costs about a microsecond in tf.data's function runtime).
#include <cstdint>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

#include "_resize.h"

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;

const char *Reason(int rc) {
  switch (rc) {
    case -1: return "the window needs pixels outside the decoded region";
    case -2: return "bad sizes";
    case -3: return "out of memory";
    default: return "unknown error";
  }
}

// Reads an int32 vector input of length n into out[]; false (and a failed context) otherwise.
bool Ints(OpKernelContext *c, int i, int n, int64_t *out) {
  const Tensor &t = c->input(i);
  if (t.NumElements() != n) {
    c->CtxFailure(absl::InvalidArgumentError(absl::StrCat("input ", i, " must have ", n,
                                                          " values, got ", t.NumElements())));
    return false;
  }
  const auto v = t.flat<int32_t>();
  for (int k = 0; k < n; ++k) out[k] = v(k);
  return true;
}

// shape (h, w of the source), crop (y, x, h, w in source pixels), out_size (h, w the crop is
// resized to), window (y, x, h, w of the resized crop), margin -> box (y, x, h, w) to decode.
class VitJaxResizeRegionOp : public OpKernel {
 public:
  explicit VitJaxResizeRegionOp(OpKernelConstruction *c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("margin", &margin_));
  }

  void Compute(OpKernelContext *c) override {
    int64_t shape[2], crop[4], out[2], win[4], box[4];
    if (!Ints(c, 0, 2, shape) || !Ints(c, 1, 4, crop) || !Ints(c, 2, 2, out) ||
        !Ints(c, 3, 4, win))
      return;
    OP_REQUIRES(c, crop[2] > 0 && crop[3] > 0 && out[0] > 0 && out[1] > 0 && win[2] > 0 &&
                       win[3] > 0,
                absl::InvalidArgumentError("VitJaxResizeRegion: empty crop, size or window"));
    vj_resize_region(shape[0], shape[1], crop, out[0], out[1], win, margin_, box);
    Tensor *t = nullptr;
    OP_REQUIRES_OK(c, c->allocate_output(0, TensorShape({4}), &t));
    for (int k = 0; k < 4; ++k) t->flat<int32_t>()(k) = static_cast<int32_t>(box[k]);
  }

 private:
  int margin_;
};

// src (uint8 [h, w, 3]: source pixels from src_yx), crop, out_size, window as above, flip,
// affine (mul, add) -> float32 [window h, window w, 3].
class VitJaxResizeWindowOp : public OpKernel {
 public:
  explicit VitJaxResizeWindowOp(OpKernelConstruction *c) : OpKernel(c) {}

  void Compute(OpKernelContext *c) override {
    const Tensor &src = c->input(0);
    OP_REQUIRES(c, src.dims() == 3 && src.dim_size(2) == 3,
                absl::InvalidArgumentError("VitJaxResizeWindow: src must be uint8 [h, w, 3], got " +
                                           src.shape().DebugString()));
    int64_t yx[2], crop[4], out[2], win[4];
    if (!Ints(c, 1, 2, yx) || !Ints(c, 2, 4, crop) || !Ints(c, 3, 2, out) || !Ints(c, 4, 4, win))
      return;
    const bool flip = c->input(5).scalar<bool>()();
    const auto a = c->input(6).flat<float>();
    OP_REQUIRES(c, a.size() == 2, absl::InvalidArgumentError("affine must have 2 values"));
    OP_REQUIRES(c, win[2] > 0 && win[3] > 0,
                absl::InvalidArgumentError("VitJaxResizeWindow: empty window"));
    Tensor *dst = nullptr;
    OP_REQUIRES_OK(c, c->allocate_output(0, TensorShape({win[2], win[3], 3}), &dst));
    const int64_t src_y = yx[0] - crop[0], src_x = yx[1] - crop[1];
    const int rc = vj_resize_bilinear_u8(
        src.flat<uint8_t>().data(), src.dim_size(0), src.dim_size(1), src.dim_size(1) * 3, src_y,
        src_x, crop[2], crop[3], out[0], out[1], win[0], win[1], win[2], win[3], flip, a(0), a(1),
        dst->flat<float>().data());
    OP_REQUIRES(c, rc == 0,
                absl::InvalidArgumentError(absl::StrCat(
                    "VitJaxResizeWindow: ", Reason(rc), "; src ", src.shape().DebugString(),
                    " at (", src_y, ", ", src_x, ") of a ", crop[2], "x", crop[3],
                    " crop resized to ", out[0], "x", out[1], ", window ", win[2], "x", win[3],
                    " at (", win[0], ", ", win[1], ")")));
  }
};

}  // namespace

REGISTER_OP("VitJaxResizeRegion")
    .Input("shape: int32")
    .Input("crop: int32")
    .Input("out_size: int32")
    .Input("window: int32")
    .Attr("margin: int")
    .Output("box: int32")
    .SetShapeFn([](InferenceContext *c) {
      c->set_output(0, c->Vector(4));
      return absl::OkStatus();
    });

REGISTER_OP("VitJaxResizeWindow")
    .Input("src: uint8")
    .Input("src_yx: int32")
    .Input("crop: int32")
    .Input("out_size: int32")
    .Input("window: int32")
    .Input("flip: bool")
    .Input("affine: float")
    .Output("out: float")
    .SetShapeFn([](InferenceContext *c) {
      c->set_output(0, c->MakeShape({c->UnknownDim(), c->UnknownDim(), 3}));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("VitJaxResizeRegion").Device(::tensorflow::DEVICE_CPU),
                        VitJaxResizeRegionOp);
REGISTER_KERNEL_BUILDER(Name("VitJaxResizeWindow").Device(::tensorflow::DEVICE_CPU),
                        VitJaxResizeWindowOp);
