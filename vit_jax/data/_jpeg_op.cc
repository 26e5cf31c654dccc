// VitJaxDecodeJpegRegion: the pixels of a JPEG around a box, exactly as a full decode gives them
// inside the box, decoding as little as libjpeg-turbo allows. Compiled on first use by fast_jpeg.py against
// a libjpeg-turbo (>= 1.5: jpeg_crop_scanline, jpeg_skip_scanlines) found on the machine.
//
// Against TensorFlow's DecodeAndCropJpeg (which also uses libjpeg-turbo) this
//  - stops after the box's last row instead of entropy-decoding the rest of the file;
//  - decodes a few pixels around the box (kMargin) so that chroma upsampling sees the same
//    neighbours as in a full decode: inside the box the result is bit-identical to decode_jpeg;
//  - returns the decoded region as libjpeg writes it, with its origin, instead of copying the
//    box out (the consumer, e.g. VitJaxResizeWindow, takes an origin);
//  - reads several rows per libjpeg call and keeps libjpeg's warnings off stderr.
// Colour handling is TensorFlow's for channels=3 with its default fast integer IDCT: YCbCr/RGB/grayscale through libjpeg's RGB
// output, CMYK/YCCK converted with the same integer formula (Adobe-inverted or not).
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

extern "C" {
#include <jerror.h>
#include <jpeglib.h>
}

#include "_resize.h"  // The resize kernel (_resize.c), linked into this library too.

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::tstring;

// Extra source pixels decoded on each side of the box. libjpeg's "fancy" chroma upsampling
// reads one neighbouring chroma sample; without it the box's outermost pixels differ from a
// full decode by up to ~20 levels. Two pixels cover 4:2:0 (one chroma sample = two pixels).
// The rows below the box are not needed: libjpeg keeps the next chroma row internally.
constexpr int kMargin = 2;
// TensorFlow's decoder's guard: refuse images of 2^29 bytes (512 MiB) or more as RGB.
constexpr int64_t kMaxBytes = int64_t{1} << 29;
// Rows asked of libjpeg per call (it returns what one of its row groups has).
constexpr int kRowsPerCall = 16;

struct ErrorManager {
  jpeg_error_mgr pub;  // First member: libjpeg passes &pub as cinfo->err.
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void OnError(j_common_ptr cinfo) {
  ErrorManager *err = reinterpret_cast<ErrorManager *>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// Warnings (corrupt entropy data that libjpeg can decode past) are counted, not printed; a file
// that ends early is an error, as in TensorFlow's decoder (libjpeg would fill it with grey).
void OnMessage(j_common_ptr cinfo, int level) {
  if (level == -1) {
    cinfo->err->num_warnings++;
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
      ErrorManager *err = reinterpret_cast<ErrorManager *>(cinfo->err);
      std::snprintf(err->message, sizeof(err->message),
                    "premature end of JPEG data (truncated file)");
      std::longjmp(err->jump, 1);
    }
  }
}

// The decoder state. Only plain C data lives between setjmp and a longjmp out of libjpeg.
struct Decoder {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  bool created = false;
  ~Decoder() {
    if (created) jpeg_destroy_decompress(&cinfo);
  }
};

// Phase 1: header. Returns false with err.message set on failure.
bool ReadHeader(Decoder *d, const tstring &contents) {
  d->cinfo.err = jpeg_std_error(&d->err.pub);
  d->err.pub.error_exit = OnError;
  d->err.pub.emit_message = OnMessage;
  d->err.message[0] = '\0';
  if (setjmp(d->err.jump)) return false;
  jpeg_create_decompress(&d->cinfo);
  d->created = true;
  jpeg_mem_src(&d->cinfo, reinterpret_cast<const unsigned char *>(contents.data()),
               static_cast<unsigned long>(contents.size()));
  jpeg_read_header(&d->cinfo, TRUE);
  const bool cmyk = d->cinfo.jpeg_color_space == JCS_CMYK || d->cinfo.jpeg_color_space == JCS_YCCK;
  d->cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  // TensorFlow's decode_jpeg/decode_image default (dct_method="") is the fast integer IDCT, so
  // the published ViT pipelines decoded with it; the same here, for the same pixels.
  d->cinfo.dct_method = JDCT_IFAST;
  d->cinfo.do_fancy_upsampling = TRUE;
  d->cinfo.scale_num = d->cinfo.scale_denom = 1;
  jpeg_calc_output_dimensions(&d->cinfo);
  return true;
}

// Phase 2: starts decoding the region that covers rows [y, y + h) and columns [x, x + w), and
// skips the rows above it. The region: kMargin more pixels on each side (clamped; none below),
// widened to the left to an iMCU boundary by libjpeg. Sets (top, left, rows, cols).
bool Start(Decoder *d, int y, int x, int h, int w, int *top, int *left, int *rows, int *cols) {
  jpeg_decompress_struct *cinfo = &d->cinfo;
  if (setjmp(d->err.jump)) return false;
  const int width = static_cast<int>(cinfo->output_width);
  const int first = y > kMargin ? y - kMargin : 0;
  const int right = x + w + kMargin < width ? x + w + kMargin : width;
  jpeg_start_decompress(cinfo);
  JDIMENSION crop_x = x > kMargin ? x - kMargin : 0, crop_w = right - crop_x;
  if (crop_x > 0 || crop_w < static_cast<JDIMENSION>(width)) {
    jpeg_crop_scanline(cinfo, &crop_x, &crop_w);  // Widens to iMCU boundaries.
  }
  if (first > 0) jpeg_skip_scanlines(cinfo, first);
  *top = first, *left = static_cast<int>(crop_x);
  *rows = y + h - first, *cols = static_cast<int>(crop_w);
  return true;
}

// Phase 3: reads the region's rows into out (rows * cols * 3 bytes). RGB rows are decoded in
// place: libjpeg's colour conversion writes past the cache, and a copy out of a row buffer costs
// as much as a third of the decode (measured).
bool Read(Decoder *d, int rows, int cols, uint8_t *out) {
  jpeg_decompress_struct *cinfo = &d->cinfo;
  if (setjmp(d->err.jump)) return false;
  const int first = static_cast<int>(cinfo->output_scanline);
  const bool cmyk = cinfo->out_color_space == JCS_CMYK;
  const bool adobe = cinfo->saw_Adobe_marker;
  const int64_t stride = static_cast<int64_t>(cols) * 3;
  JSAMPARRAY buffer = nullptr;
  if (cmyk) {
    buffer = (*cinfo->mem->alloc_sarray)(reinterpret_cast<j_common_ptr>(cinfo), JPOOL_IMAGE,
                                         cols * 4, kRowsPerCall);
  }
  JSAMPROW pointers[kRowsPerCall];
  for (int done = 0; done < rows;) {
    const int want = rows - done < kRowsPerCall ? rows - done : kRowsPerCall;
    if (!cmyk) {
      for (int r = 0; r < want; ++r) pointers[r] = out + (done + r) * stride;
    }
    const int got = static_cast<int>(jpeg_read_scanlines(cinfo, cmyk ? buffer : pointers, want));
    if (got == 0) {
      std::snprintf(d->err.message, sizeof(d->err.message),
                    "premature end of JPEG data at row %d of %d", first + done,
                    static_cast<int>(cinfo->output_height));
      return false;
    }
    for (int r = 0; cmyk && r < got; ++r) {
      const JSAMPLE *src = buffer[r];
      uint8_t *dst = out + (done + r) * stride;
      for (int i = 0; i < cols; ++i, src += 4, dst += 3) {
        const int c = src[0], m = src[1], ye = src[2], k = src[3];
        if (adobe) {  // Adobe's CMYK is stored inverted.
          dst[0] = k * c / 255, dst[1] = k * m / 255, dst[2] = k * ye / 255;
        } else {
          dst[0] = (255 - k) * (255 - c) / 255;
          dst[1] = (255 - k) * (255 - m) / 255;
          dst[2] = (255 - k) * (255 - ye) / 255;
        }
      }
    }
    done += got;
  }
  // The rows below are never decoded: jpeg_destroy_decompress (in ~Decoder) aborts the decode.
  return true;
}

// contents (string), box (int32 y, x, h, w; h or w <= 0: to the image's edge) -> image (uint8
// [rows, cols, 3]), origin (int32 [2]: the image's top-left in the JPEG). The image covers the
// box; inside the box its pixels are exactly a full decode's, outside it they may not be.
class VitJaxDecodeJpegRegionOp : public OpKernel {
 public:
  explicit VitJaxDecodeJpegRegionOp(OpKernelConstruction *c) : OpKernel(c) {}

  void Compute(OpKernelContext *c) override {
    const Tensor &contents = c->input(0);
    const Tensor &box = c->input(1);
    OP_REQUIRES(c, contents.NumElements() == 1 && box.NumElements() == 4,
                absl::InvalidArgumentError(
                    "VitJaxDecodeJpegRegion: expects one JPEG string and a box (y, x, h, w)"));
    const tstring &bytes = contents.flat<tstring>()(0);
    const auto b = box.flat<int32_t>();
    Decoder d;
    const auto invalid = [&d]() {
      return absl::InvalidArgumentError(
          absl::StrCat("VitJaxDecodeJpegRegion: invalid JPEG data (", d.err.message, ")"));
    };
    OP_REQUIRES(c, ReadHeader(&d, bytes), invalid());
    const int64_t height = d.cinfo.output_height, width = d.cinfo.output_width;
    OP_REQUIRES(c, height > 0 && width > 0 && height * width * 3 < kMaxBytes,
                absl::InvalidArgumentError(absl::StrCat(
                    "VitJaxDecodeJpegRegion: bad image size ", height, "x", width)));
    const int64_t y = b(0), x = b(1);
    const int64_t h = b(2) > 0 ? b(2) : height - y, w = b(3) > 0 ? b(3) : width - x;
    OP_REQUIRES(c, y >= 0 && x >= 0 && h > 0 && w > 0 && y + h <= height && x + w <= width,
                absl::InvalidArgumentError(absl::StrCat(
                    "VitJaxDecodeJpegRegion: box (y=", y, ", x=", x, ", h=", h, ", w=", w,
                    ") is not inside the ", height, "x", width, " image")));
    int top, left, rows, cols;
    OP_REQUIRES(c, Start(&d, y, x, h, w, &top, &left, &rows, &cols), invalid());
    Tensor *image = nullptr, *origin = nullptr;
    OP_REQUIRES_OK(c, c->allocate_output(0, TensorShape({rows, cols, 3}), &image));
    OP_REQUIRES_OK(c, c->allocate_output(1, TensorShape({2}), &origin));
    origin->flat<int32_t>()(0) = top, origin->flat<int32_t>()(1) = left;
    OP_REQUIRES(c, Read(&d, rows, cols, image->flat<uint8_t>().data()), invalid());
  }
};

REGISTER_OP("VitJaxDecodeJpegRegion")
    .Input("contents: string")
    .Input("box: int32")
    .Output("image: uint8")
    .Output("origin: int32")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext *c) {
      c->set_output(0, c->MakeShape({c->UnknownDim(), c->UnknownDim(), 3}));
      c->set_output(1, c->MakeShape({2}));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("VitJaxDecodeJpegRegion").Device(::tensorflow::DEVICE_CPU),
                        VitJaxDecodeJpegRegionOp);

// A batch of lazy images computed straight into the batch: each example's pixels (the JPEG region
// its window reads, decoded here; or the decoded pixels handed in) resized bilinearly to its
// window, flipped and mapped by value * mul + add, written to row i of the [b, height, width, 3]
// output. Replaces per example: a decode op, a resize op, the per-example output tensor and
// tf.data's copy of it into the batch.
//
// contents: string [b] (JPEG bytes where plan[i][0] == 1)
// pixels: uint8 [b, n] (where plan[i][0] == 0: the decoded image, h * w * 3 values first)
// plan: int32 [b, 12]: is_jpeg, h, w (the source's), crop y, x, h, w (in the source), size h, w
//   (the crop is resized to), window y, x (of the resized crop), flip.
// keep: bool [b]: false rows (an eval batch's padding) are zeros, not decoded.
class VitJaxDecodeResizeBatchOp : public OpKernel {
 public:
  explicit VitJaxDecodeResizeBatchOp(OpKernelConstruction *c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("height", &height_));
    OP_REQUIRES_OK(c, c->GetAttr("width", &width_));
    OP_REQUIRES_OK(c, c->GetAttr("mul", &mul_));
    OP_REQUIRES_OK(c, c->GetAttr("add", &add_));
  }

  void Compute(OpKernelContext *c) override {
    const Tensor &contents = c->input(0), &pixels = c->input(1), &plan = c->input(2);
    const Tensor &keep = c->input(3);
    OP_REQUIRES(c, contents.dims() == 1 && pixels.dims() == 2 && plan.dims() == 2 &&
                       keep.dims() == 1 && plan.dim_size(1) == 12 &&
                       contents.dim_size(0) == plan.dim_size(0) &&
                       pixels.dim_size(0) == plan.dim_size(0) &&
                       keep.dim_size(0) == plan.dim_size(0),
                absl::InvalidArgumentError(absl::StrCat(
                    "VitJaxDecodeResizeBatch: expects contents [b], pixels [b, n], plan [b, 12], "
                    "keep [b]; got ", contents.shape().DebugString(), ", ",
                    pixels.shape().DebugString(), ", ", plan.shape().DebugString(), ", ",
                    keep.shape().DebugString())));
    const int64_t b = plan.dim_size(0), n = pixels.dim_size(1);
    Tensor *out = nullptr;
    OP_REQUIRES_OK(c, c->allocate_output(0, TensorShape({b, height_, width_, 3}), &out));
    const auto p = plan.matrix<int32_t>();
    const auto bytes = contents.flat<tstring>();
    const uint8_t *given = pixels.flat<uint8_t>().data();
    float *dst = out->flat<float>().data();
    const auto kept = keep.flat<bool>();
    std::vector<uint8_t> scratch;
    for (int64_t i = 0; i < b; ++i) {
      if (!kept(i)) {
        std::memset(dst + i * height_ * width_ * 3, 0, sizeof(float) * height_ * width_ * 3);
        continue;
      }
      const int64_t h = p(i, 1), w = p(i, 2);
      const int64_t crop[4] = {p(i, 3), p(i, 4), p(i, 5), p(i, 6)};
      const int64_t size_h = p(i, 7), size_w = p(i, 8);
      const int64_t win[4] = {p(i, 9), p(i, 10), height_, width_};
      OP_REQUIRES(c, h > 0 && w > 0 && crop[2] > 0 && crop[3] > 0 && size_h > 0 && size_w > 0,
                  absl::InvalidArgumentError(absl::StrCat(
                      "VitJaxDecodeResizeBatch: example ", i, ": empty image, crop or size")));
      OP_REQUIRES(c, h * w * 3 < kMaxBytes,
                  absl::InvalidArgumentError(absl::StrCat("VitJaxDecodeResizeBatch: example ", i,
                                                          ": bad image size ", h, "x", w)));
      OP_REQUIRES(c, crop[0] >= 0 && crop[1] >= 0 && crop[0] + crop[2] <= h &&
                         crop[1] + crop[3] <= w && win[0] >= 0 && win[1] >= 0 &&
                         win[0] + height_ <= size_h && win[1] + width_ <= size_w,
                  absl::InvalidArgumentError(absl::StrCat(
                      "VitJaxDecodeResizeBatch: example ", i, ": crop (", crop[0], ", ", crop[1],
                      ", ", crop[2], ", ", crop[3], ") of the ", h, "x", w, " image or window (",
                      win[0], ", ", win[1], ", ", height_, ", ", width_, ") of the ", size_h, "x",
                      size_w, " resize is out of bounds")));
      const uint8_t *src;
      int64_t top = 0, left = 0, rows = h, cols = w;
      if (p(i, 0)) {
        int64_t box[4];
        vj_resize_region(h, w, crop, size_h, size_w, win, 0, box);
        Decoder d;
        const auto invalid = [&d, i]() {
          return absl::InvalidArgumentError(absl::StrCat(
              "VitJaxDecodeResizeBatch: example ", i, ": invalid JPEG data (", d.err.message,
              ")"));
        };
        OP_REQUIRES(c, ReadHeader(&d, bytes(i)), invalid());
        OP_REQUIRES(c, d.cinfo.output_height == h && d.cinfo.output_width == w,
                    absl::InvalidArgumentError(absl::StrCat(
                        "VitJaxDecodeResizeBatch: example ", i, ": the JPEG is ",
                        d.cinfo.output_height, "x", d.cinfo.output_width, ", the plan says ", h,
                        "x", w)));
        int t, l, r, cl;
        OP_REQUIRES(c, Start(&d, box[0], box[1], box[2], box[3], &t, &l, &r, &cl), invalid());
        top = t, left = l, rows = r, cols = cl;
        if (scratch.size() < static_cast<size_t>(rows * cols * 3)) scratch.resize(rows * cols * 3);
        OP_REQUIRES(c, Read(&d, r, cl, scratch.data()), invalid());
        src = scratch.data();
      } else {
        OP_REQUIRES(c, h * w * 3 <= n,
                    absl::InvalidArgumentError(absl::StrCat(
                        "VitJaxDecodeResizeBatch: example ", i, ": ", h, "x", w,
                        " pixels do not fit in ", n, " values")));
        src = given + i * n;
      }
      const int rc = vj_resize_bilinear_u8(
          src, rows, cols, cols * 3, top - crop[0], left - crop[1], crop[2], crop[3], size_h,
          size_w, win[0], win[1], height_, width_, p(i, 11) != 0, mul_, add_,
          dst + i * height_ * width_ * 3);
      OP_REQUIRES(c, rc == 0,
                  absl::InvalidArgumentError(absl::StrCat(
                      "VitJaxDecodeResizeBatch: example ", i, ": resize failed (", rc,
                      ") for crop (", crop[0], ", ", crop[1], ", ", crop[2], ", ", crop[3],
                      ") of a ", h, "x", w, " image resized to ", size_h, "x", size_w)));
    }
  }

 private:
  int height_, width_;
  float mul_, add_;
};

REGISTER_OP("VitJaxDecodeResizeBatch")
    .Input("contents: string")
    .Input("pixels: uint8")
    .Input("plan: int32")
    .Input("keep: bool")
    .Attr("height: int")
    .Attr("width: int")
    .Attr("mul: float")
    .Attr("add: float")
    .Output("images: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext *c) {
      int height, width;
      TF_RETURN_IF_ERROR(c->GetAttr("height", &height));
      TF_RETURN_IF_ERROR(c->GetAttr("width", &width));
      c->set_output(0, c->MakeShape({c->Dim(c->input(2), 0), height, width, 3}));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("VitJaxDecodeResizeBatch").Device(::tensorflow::DEVICE_CPU),
                        VitJaxDecodeResizeBatchOp);

// contents: string [b] -> int32 [b, 3]: (1, height, width) of each JPEG, read from its header;
// (0, 0, 0) for data that does not start like a JPEG (tf.io.is_jpeg's test), which is left to
// other decoders. A batch of headers in one op: a per-example op costs more than the read.
class VitJaxJpegShapesOp : public OpKernel {
 public:
  explicit VitJaxJpegShapesOp(OpKernelConstruction *c) : OpKernel(c) {}

  void Compute(OpKernelContext *c) override {
    const Tensor &contents = c->input(0);
    OP_REQUIRES(c, contents.dims() == 1,
                absl::InvalidArgumentError("VitJaxJpegShapes: expects a vector of strings"));
    const int64_t b = contents.dim_size(0);
    Tensor *out = nullptr;
    OP_REQUIRES_OK(c, c->allocate_output(0, TensorShape({b, 3}), &out));
    auto o = out->matrix<int32_t>();
    const auto bytes = contents.flat<tstring>();
    for (int64_t i = 0; i < b; ++i) {
      const tstring &s = bytes(i);
      o(i, 0) = o(i, 1) = o(i, 2) = 0;
      if (s.size() < 3 || static_cast<uint8_t>(s[0]) != 0xFF ||
          static_cast<uint8_t>(s[1]) != 0xD8 || static_cast<uint8_t>(s[2]) != 0xFF)
        continue;
      Decoder d;
      OP_REQUIRES(c, ReadHeader(&d, s),
                  absl::InvalidArgumentError(absl::StrCat("VitJaxJpegShapes: example ", i,
                                                          ": invalid JPEG data (",
                                                          d.err.message, ")")));
      o(i, 0) = 1, o(i, 1) = d.cinfo.output_height, o(i, 2) = d.cinfo.output_width;
    }
  }
};

REGISTER_OP("VitJaxJpegShapes")
    .Input("contents: string")
    .Output("shapes: int32")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext *c) {
      c->set_output(0, c->MakeShape({c->Dim(c->input(0), 0), 3}));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("VitJaxJpegShapes").Device(::tensorflow::DEVICE_CPU),
                        VitJaxJpegShapesOp);

}  // namespace
