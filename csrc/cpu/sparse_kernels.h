// The boundary between the op (torch headers, portable flags) and the per-ISA kernel files, which
// include no torch or std headers: an inline function compiled with AVX-512 flags in one file could
// otherwise be merged by the linker into the portable code, and run on a CPU without AVX-512.
//
// The weight format every kernel reads (bitmask-compressed rows, as runtime/formats/bitmask.py stores them):
//   values:  the kept weights of each row in column order, rows one after another (flat);
//   offsets: out_features + 1 int64, row n's values are values[offsets[n] .. offsets[n + 1]);
//   mask:    out_features x mask_stride bytes, bit j of byte b (LSB first) = column 8b + j is kept.
// A packed 2:4 weight is this format with a fixed K/2 values per row: its meta is converted byte by byte.
#pragma once
#include <stdint.h>

namespace mixsparse {

struct KernelArgs {
  const void* x;           // M x K activations (row stride x_stride elements), the weight's dtype
  int64_t x_stride;
  const void* values;      // kept weights
  const int64_t* offsets;  // out_features + 1
  const uint8_t* mask;     // out_features x mask_stride
  int64_t mask_stride;
  const void* bias;        // out_features, or null
  void* y;                 // M x out_features (row stride y_stride elements)
  int64_t y_stride;
  int64_t M, K;
};

// y[:, n0:n1] for all M tokens, streaming the compressed rows (decode: W is never materialised)
typedef void (*RowsFn)(const KernelArgs& args, int64_t n0, int64_t n1);
// rows n0..n1 expanded into a dense (n1 - n0) x K tile with zeros (prefill: a dense GEMM follows)
typedef void (*UnpackFn)(const KernelArgs& args, int64_t n0, int64_t n1, void* tile);

enum Dtype { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kDtypes = 3 };

struct IsaKernels {
  const char* name;
  RowsFn rows[kDtypes];      // null: this ISA has no kernel for the dtype (the portable one runs)
  UnpackFn unpack[kDtypes];
};

#ifdef MIXSPARSE_HAS_AVX512
// AVX-512 F/BW/VL/DQ + BF16 + VBMI2 (vpexpandw); call only when the CPU reports all of them
const IsaKernels* avx512_kernels();
#endif

}  // namespace mixsparse
