// torch.ops.mixsparse_cpu.sparse_linear: y = x Wᵀ + b for a bitmask-compressed W (2:4 included) that
// stays compressed in memory. Few tokens (decode): every thread streams its block of compressed rows
// once and never materialises W. Many tokens (prefill): every thread expands a block of rows into a
// dense tile sized for L2 and runs a dense GEMM on it (the pattern of vLLM's csrc/cpu/cpu_wna16.cpp).
//
// This file holds the torch-facing side: argument checks, the choice of instruction set (once, from
// what the CPU reports), threads (torch's intra-op pool, so torch.set_num_threads and vLLM's thread
// binding apply) and the portable kernels that always exist. The AVX-512 kernels live in their own
// file compiled with their own target flags (sparse_kernels_avx512.cpp).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "sparse_kernels.h"

namespace mixsparse {
namespace {

// ---- portable kernels: any dtype torch converts to float; correctness first, no intrinsics ----

template <typename scalar_t>
void rows_portable(const KernelArgs& a, int64_t n0, int64_t n1) {
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* values = static_cast<const scalar_t*>(a.values);
  const auto* bias = static_cast<const scalar_t*>(a.bias);
  auto* y = static_cast<scalar_t*>(a.y);
  const int64_t full_bytes = a.K / 8, tail_bits = a.K % 8;
  std::vector<float> acc(a.M);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const scalar_t* v = values + a.offsets[n];
    const uint8_t* mask = a.mask + n * a.mask_stride;
    for (int64_t b = 0; b < full_bytes + (tail_bits ? 1 : 0); ++b) {
      unsigned bits = mask[b];
      if (b == full_bytes) bits &= (1u << tail_bits) - 1;  // bits past K are not weights
      while (bits) {
        const int64_t k = 8 * b + __builtin_ctz(bits);
        bits &= bits - 1;
        const float w = static_cast<float>(*v++);
        for (int64_t m = 0; m < a.M; ++m) acc[m] += w * static_cast<float>(x[m * a.x_stride + k]);
      }
    }
    const float b = bias ? static_cast<float>(bias[n]) : 0.0f;
    for (int64_t m = 0; m < a.M; ++m) y[m * a.y_stride + n] = static_cast<scalar_t>(acc[m] + b);
  }
}

template <typename scalar_t>
void unpack_portable(const KernelArgs& a, int64_t n0, int64_t n1, void* tile) {
  const auto* values = static_cast<const scalar_t*>(a.values);
  const int64_t full_bytes = a.K / 8, tail_bits = a.K % 8;
  for (int64_t n = n0; n < n1; ++n) {
    scalar_t* out = static_cast<scalar_t*>(tile) + (n - n0) * a.K;
    std::fill(out, out + a.K, static_cast<scalar_t>(0.0f));
    const scalar_t* v = values + a.offsets[n];
    const uint8_t* mask = a.mask + n * a.mask_stride;
    for (int64_t b = 0; b < full_bytes + (tail_bits ? 1 : 0); ++b) {
      unsigned bits = mask[b];
      if (b == full_bytes) bits &= (1u << tail_bits) - 1;
      while (bits) {
        out[8 * b + __builtin_ctz(bits)] = *v++;
        bits &= bits - 1;
      }
    }
  }
}

const IsaKernels kPortable = {
    "portable",
    {rows_portable<float>, rows_portable<c10::BFloat16>, rows_portable<c10::Half>},
    {unpack_portable<float>, unpack_portable<c10::BFloat16>, unpack_portable<c10::Half>},
};

// ---- instruction-set choice: once per process, from CPUID (never from how this was compiled) ----

bool cpu_has_avx512_kernels() {
#if defined(MIXSPARSE_HAS_AVX512) && defined(__x86_64__)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the zmm and mask registers (XGETBV)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

const IsaKernels* best_kernels() {
  // MIXSPARSE_CPU_ISA=portable forces the portable kernels (benchmarks, and a way out if ever needed)
  static const IsaKernels* chosen = [] {
    const char* forced = std::getenv("MIXSPARSE_CPU_ISA");
    if (forced && std::string(forced) == "portable") return &kPortable;
#ifdef MIXSPARSE_HAS_AVX512
    if (cpu_has_avx512_kernels()) return avx512_kernels();
#endif
    return &kPortable;
  }();
  return chosen;
}

const IsaKernels* kernels_named(const std::string& name) {
  if (name.empty() || name == "best") return best_kernels();
  if (name == "portable") return &kPortable;
#ifdef MIXSPARSE_HAS_AVX512
  if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512_kernels(), "mixsparse: this CPU lacks the AVX-512 features the avx512 kernels need");
    return avx512_kernels();
  }
#endif
  TORCH_CHECK(false, "mixsparse: no CPU kernel variant named '", name, "' in this build");
}

Dtype dtype_index(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: TORCH_CHECK(false, "mixsparse: CPU sparse kernels take float32, bfloat16 or float16, not ", type);
  }
}

// Where the streaming kernel hands over to tiles + a dense GEMM, and how large a tile is. Chosen from
// stand-alone timings on the AMD EPYC (1 thread, 4096x4096 bf16): the panel path kept up with oneDNN up to
// ~64 tokens, and at 256 tokens tiles of 256-512 rows (2 MiB at K=4096) ran faster than 48-128 rows.
// `benchmarks/cpu_gemm.py --sweep` times both paths per shape to revisit these on another CPU (no
// published sweep yet). The dense GEMM is torch's (oneDNN for bf16).
struct Tuning {
  int64_t tile_min_tokens;  // from this many tokens on, tiles
  int64_t tile_bytes;       // one thread's dense tile
};

Tuning default_tuning(const IsaKernels* isa) { return {isa == &kPortable ? 4 : 64, 2 * 1024 * 1024}; }

// The arguments are a SparseWeight's fields (runtime/weight.py) in the order the registered CUDA/dense op
// torch.ops.mixsparse.sparse_linear takes them: x, values, the index (here mask, then offsets), bias, out.
at::Tensor sparse_linear_with(const IsaKernels* isa, Tuning tuning, const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& mask, const at::Tensor& offsets,
                              const c10::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu() && offsets.device().is_cpu(),
              "mixsparse.sparse_linear (CPU): x, values, mask and offsets must be CPU tensors");
  TORCH_CHECK(x.dim() >= 1, "mixsparse.sparse_linear: x must have at least one dimension");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "mixsparse.sparse_linear: values are ", values.scalar_type(),
              " but x is ", x.scalar_type(), " (prepare the weight in the activation dtype)");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "mixsparse.sparse_linear: values must be 1-D contiguous");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.numel() == out_features + 1,
              "mixsparse.sparse_linear: offsets must be int64 of out_features + 1 = ", out_features + 1, " elements");
  const int64_t K = x.size(-1);
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == out_features &&
                  mask.size(1) == (K + 7) / 8 && mask.is_contiguous(),
              "mixsparse.sparse_linear: mask must be uint8 of shape [", out_features, ", ", (K + 7) / 8,
              "] for ", K, " inputs, got ", mask.sizes());
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->numel() == out_features,
                "mixsparse.sparse_linear: bias must be 1-D of out_features = ", out_features, " in x's dtype");
  }
  const Dtype dtype = dtype_index(x.scalar_type());
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int64_t M = x2d.size(0), N = out_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.reshape(out_shape);
  if (K == 0) {
    y.zero_();
    if (bias) y.add_(b);
    return y.reshape(out_shape);
  }

  KernelArgs args{x2d.data_ptr(), K, values.data_ptr(), offsets.data_ptr<int64_t>(), mask.data_ptr<uint8_t>(),
                  mask.size(1), bias ? b.data_ptr() : nullptr, y.data_ptr(), N, M, K};
  const RowsFn rows = isa->rows[dtype] ? isa->rows[dtype] : kPortable.rows[dtype];
  const UnpackFn unpack = isa->unpack[dtype] ? isa->unpack[dtype] : kPortable.unpack[dtype];
  const IsaKernels* used = isa->rows[dtype] ? isa : &kPortable;

  if (tuning.tile_min_tokens < 0) tuning.tile_min_tokens = default_tuning(used).tile_min_tokens;
  if (tuning.tile_bytes <= 0) tuning.tile_bytes = default_tuning(used).tile_bytes;
  if (M < tuning.tile_min_tokens) {
    // a task of at least ~64K multiply-adds, so small layers do not pay for waking threads
    const int64_t grain = std::max<int64_t>(4, (1 << 16) / std::max<int64_t>(1, K * M));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(args, n0, n1); });
    return y.reshape(out_shape);
  }

  // tiles of rows: a multiple of 16 (or all N) whose dense copy fits tuning.tile_bytes, though never under 16
  // rows, and small enough for about 4 tiles per thread where N allows it, so the threads stay balanced
  const int64_t element = x.element_size();
  const int64_t by_cache = std::max<int64_t>(16, tuning.tile_bytes / (K * element) / 16 * 16);
  const int64_t by_threads = std::max<int64_t>(16, (N / (4 * at::get_num_threads()) + 15) / 16 * 16);
  const int64_t tile_rows = std::min({by_cache, by_threads, N});
  const int64_t tiles = (N + tile_rows - 1) / tile_rows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor tile = at::empty({tile_rows, K}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile_rows, n1 = std::min(N, n0 + tile_rows);
      at::Tensor dense = tile.narrow(0, 0, n1 - n0);
      unpack(args, n0, n1, dense.data_ptr());
      // inside parallel_for torch runs this GEMM on the calling thread only
      at::Tensor part = bias ? at::addmm(b.narrow(0, n0, n1 - n0), x2d, dense.t()) : at::mm(x2d, dense.t());
      y.narrow(1, n0, n1 - n0).copy_(part);
    }
  });
  return y.reshape(out_shape);
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                         const at::Tensor& offsets, const c10::optional<at::Tensor>& bias, int64_t out_features) {
  return sparse_linear_with(best_kernels(), {-1, -1}, x, values, mask, offsets, bias, out_features);
}

}  // namespace
}  // namespace mixsparse

TORCH_LIBRARY(mixsparse_cpu, m) {
  m.def("sparse_linear(Tensor x, Tensor values, Tensor mask, Tensor offsets, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixsparse_cpu, CPU, m) { m.impl("sparse_linear", &mixsparse::sparse_linear); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "mixsparse CPU kernels for compressed sparse weights (registers torch.ops.mixsparse_cpu)";
  module.def("isa", [] { return std::string(mixsparse::best_kernels()->name); },
             "The instruction-set variant the op runs on this CPU: 'avx512' or 'portable'");
  module.def("variants", [] {
    std::vector<std::string> names{"portable"};
    if (mixsparse::cpu_has_avx512_kernels()) names.push_back("avx512");
    return names;
  }, "The variants this build can run on this CPU");
  module.def("sparse_linear_with",
             [](const std::string& isa, const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                const at::Tensor& offsets, const c10::optional<at::Tensor>& bias, int64_t out_features,
                int64_t tile_min_tokens, int64_t tile_bytes) {
               return mixsparse::sparse_linear_with(mixsparse::kernels_named(isa), {tile_min_tokens, tile_bytes}, x,
                                                    values, mask, offsets, bias, out_features);
             },
             pybind11::arg("isa"), pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("mask"),
             pybind11::arg("offsets"), pybind11::arg("bias"), pybind11::arg("out_features"),
             pybind11::arg("tile_min_tokens") = -1, pybind11::arg("tile_bytes") = -1,
             "The op on a named variant ('portable', 'avx512') with optional tuning (-1: the default), "
             "for tests and benchmarks");
}
