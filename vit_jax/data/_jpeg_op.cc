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

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

extern "C" {
#include <jerror.h>
#include <jpeglib.h>
}

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

}  // namespace
