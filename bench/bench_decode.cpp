// Model-sized decode: the 210 linear layers of a bitnet-b1.58-2B-4T-shaped stack (30 blocks of q, k,
// v, o, gate, up, down; hidden 2560, intermediate 6912, 20 heads / 5 kv heads of 128), distinct
// weights, ~0.5 GB packed: far beyond any L3, so every token streams all of it from DRAM.
//
//   decode_stack/batch/threads  one forward of `batch` tokens through every layer (BitLinear<float>
//                               forward(x, y), activation quantization and rescale included). In the
//                               same iteration, just before, the DRAM read floor of the same bytes
//                               (every layer's packed buffer read once, in the same order, by as many
//                               threads: a plain streaming read), because a shared VM's bandwidth
//                               drifts from minute to minute. Counters: floor_ms, ms_per_token,
//                               ratio_to_floor, tokens_per_s (of the linear part), GB_per_s.
//   read_floor/threads          the floor alone.
//   layer_hot/out/in/batch/threads  one layer of the stack again and again (weights hot in L2 / L3):
//                               30 x the sum over the 7 layers of a block is the stack without DRAM.
//   decode_group128/batch/threads/per_block/float_scales  the same stack with group scales (issue 20):
//                               one scale per 128 inputs of a row, binary16 values (float_scales 0, as
//                               imported models have) or not (1), per-token (per_block 0) or per-block
//                               (1) activation scales, run as BitLinear runs a group-scaled layer (one
//                               token per token: the fused kernel ternary_gemv_grouped; else
//                               detail::quantize_rows_grouped, ternary_gemm over virtual blocks, the
//                               grouped_rescale epilogue) on the same packed bytes (2560 and 6912
//                               are multiples of 128). Each iteration runs the per-tensor stack and
//                               then the grouped one: counters tensor_ms, group_ms and
//                               group_to_tensor (their ratio, the goal: <= 1.08 at batch 1),
//                               and bytes_ratio, the grouped stack's bytes (packed codes and the
//                               scales read: 16 or 32 bits per 128 weights) over the packed codes alone:
//                               the ratio a purely DRAM-bound decode would show.
//   layer_hot_group128/out/in/batch/threads/per_block/float_scales  one grouped layer, hot.
//   decode_base3/batch/threads  the same stack stored in base 3 (bitlinear_options::storage base3,
//                               1.6 bits per weight, the same codes and scales) against the 2-bit one in
//                               the same iteration, each after its own read floor: counters two_bit_ms,
//                               base3_ms, speedup (two_bit_ms / base3_ms, the goal: >= 1.15 at
//                               batch 1), floor_two_bit_ms, floor_base3_ms, base3_to_floor, bytes_ratio.
//   layer_hot_base3/out/in/batch/threads  one base-3 layer, hot (against layer_hot: the decode's cost).
//
// The Eigen float32 reference per layer is bitnet_bench_eigen_native (same shapes); bench/decode_report.py
// turns the JSON files into the table of docs/benchmarks.md. Memory: the packed stack (~0.52 GB) plus
// one layer's codes while building it, and the base-3 stack (~0.42 GB) once decode_base3 runs.
#include <bitnet/bitnet.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using bitnet::Index;
using bitnet::Matrix;

constexpr Index hidden = 2560, intermediate = 6912, kv_width = 5 * 128, blocks = 30;

struct shape {
  Index out, in;
};
// One transformer block's projections in the order a token meets them.
constexpr shape block_shapes[] = {{hidden, hidden},       {kv_width, hidden},     {kv_width, hidden},
                                  {hidden, hidden},       {intermediate, hidden}, {intermediate, hidden},
                                  {hidden, intermediate}};

/// Ternary codes (about a third each of -1, 0, +1) from a cheap generator: 2.4 G of them must be
/// drawn in seconds.
Matrix<std::int8_t> random_codes(Index out, Index in, std::uint64_t seed) {
  Matrix<std::int8_t> codes(out, in);
  std::uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (Index i = 0; i < codes.size(); ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    codes.data()[i] = std::int8_t(int((s >> 32) % 3) - 1);
  }
  return codes;
}

Matrix<float> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

struct stack {
  std::vector<bitnet::BitLinear<float>> layers;
  std::size_t bytes = 0;

  /// The stack in 2 bits (instance()) or in base 3 (base3()): the same codes, scales and biases.
  static stack build(bitnet::weight_storage storage) {
    stack s;
    s.layers.reserve(std::size(block_shapes) * blocks);
    for (Index b = 0; b < blocks; ++b)
      for (const shape& sh : block_shapes) {
        const std::uint64_t seed = std::uint64_t(s.layers.size()) + 1;
        s.layers.push_back(bitnet::BitLinear<float>::from_ternary(random_codes(sh.out, sh.in, seed), 0.7f + 0.01f * float(b),
                                                                  bitnet::Vector<float>::Constant(sh.out, 0.01f),
                                                                  {.storage = storage}));
        s.bytes += s.layers.back().packed_bytes();
      }
    return s;
  }
  static const stack& instance() {
    static const stack built = build(bitnet::weight_storage::two_bit);
    return built;
  }
  static const stack& base3() {
    static const stack built = build(bitnet::weight_storage::base3);
    return built;
  }
};

const std::uint8_t* packed_data(const bitnet::BitLinear<float>& layer) {
  return layer.options().storage == bitnet::weight_storage::base3 ? layer.base3_weight().data()
                                                                    : layer.packed_weight().data();
}

/// Sums `bytes` bytes (a multiple of 64, 64-byte aligned) with independent accumulators: a plain
/// streaming read at whatever rate the memory delivers.
#if defined(__x86_64__)
__attribute__((target("avx2"))) std::uint64_t read_bytes(const std::uint8_t* p, std::size_t bytes) noexcept {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (std::size_t i = 0; i < bytes; i += 128) {
    s0 = _mm256_add_epi64(s0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  alignas(32) std::uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
#else
std::uint64_t read_bytes(const std::uint8_t* p, std::size_t bytes) noexcept {
  std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (std::size_t i = 0; i < bytes; i += 32) {
    std::uint64_t v[4];
    std::memcpy(v, p + i, sizeof v);
    s0 += v[0], s1 += v[1], s2 += v[2], s3 += v[3];
  }
  return s0 + s1 + s2 + s3;
}
#endif

/// Reads every layer's packed bytes once, in stack order, over `threads` threads of the library's
/// pool (thread i reads the i-th share of each layer, as the kernels split a layer's rows).
struct floor_read {
  const stack* s;
  int threads;
  mutable std::uint64_t sink[8] = {};

  static void run_part(const void* self, Index part) noexcept {
    const floor_read& f = *static_cast<const floor_read*>(self);
    std::uint64_t total = 0;
    for (const auto& layer : f.s->layers) {
      const std::size_t lines = layer.packed_bytes() / 64;
      const std::size_t per = (lines + std::size_t(f.threads) - 1) / std::size_t(f.threads);
      const std::size_t begin = std::min(lines, per * std::size_t(part)), end = std::min(lines, begin + per);
      total += read_bytes(packed_data(layer) + begin * 64, (end - begin) * 64);
    }
    f.sink[part] = total;
  }

  double seconds() const {
    const auto t0 = std::chrono::steady_clock::now();
    bitnet::detail::thread_pool::instance().run(threads, run_part, this);
    const auto t1 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(sink[0] + sink[1]);
    return std::chrono::duration<double>(t1 - t0).count();
  }
};

/// One layer of the stack with group scales: the per-tensor layer's packed codes (already aligned
/// to 128 columns), unit scales d (out x in / 128), the same in the fused kernel's order, and the
/// bias; forward as BitLinear makes it: one token with per-token activations through the fused
/// kernel (ternary_gemv_grouped) where it runs, else virtual blocks and the grouped_rescale epilogue.
struct grouped_layer {
  static constexpr Index group = 128;
  const bitnet::packed_ternary* packed;
  Matrix<float> d;
  bitnet::Vector<float> bias;
  bitnet::detail::kernel_unit_scales kernel_scales;

  Index out() const { return packed->rows(); }
  Index in() const { return packed->cols(); }

  static bool fused(Index batch, bool per_block) {
    return batch == 1 && !per_block && bitnet::detail::fused_grouped_gemv(bitnet::active_isa(), group);
  }
  /// The scale bytes a forward of this kind reads.
  double scale_bytes(Index batch, bool per_block) const {
    return fused(batch, per_block) ? double(kernel_scales.bytes()) : double(d.size()) * sizeof(float);
  }

  void forward(const Matrix<float>& x, Matrix<float>& y, bool per_block) const {
    namespace detail = bitnet::detail;
    const bitnet::isa kernels = bitnet::active_isa();
    const int threads = bitnet::num_threads();
    const Index batch = x.rows(), stride = packed->padded_cols(), kernel_groups = stride / group,
                groups = (in() + group - 1) / group, virtual_rows = packed->row_blocks() * kernel_groups * 16;
    using detail::scratch_slot;
    std::int8_t* xq = detail::thread_scratch_of<std::int8_t, scratch_slot::activations>(std::size_t(batch * stride));
    float* scales = detail::thread_scratch_of<float, scratch_slot::scales>(std::size_t(batch * groups));
    std::int32_t* sums = detail::thread_scratch_of<std::int32_t, scratch_slot::sums>(std::size_t(batch * kernel_groups));
    detail::quantize_rows_grouped(kernels, x.data(), in(), batch, in(), group, per_block, xq, stride, scales, sums,
                                  threads);
    if (fused(batch, per_block)) {
      const detail::grouped_gemv_args args{packed->data(),       group / 16,          kernel_groups, out(),
                                           xq,                   sums,                kernel_scales.data(),
                                           kernel_scales.half(), scales[0],           bias.data(),   y.data()};
      detail::ternary_gemv_grouped(kernels, args, packed->row_blocks(), threads);
      return;
    }
    std::int32_t* acc =
        detail::thread_scratch_of<std::int32_t, scratch_slot::accumulators>(std::size_t(batch * virtual_rows));
    const detail::grouped_rescale<float> rescale{kernels, acc,      virtual_rows, batch,     out(),       kernel_groups,
                                                 groups,  d.data(), scales,       per_block, bias.data(), y.data(),
                                                 y.outerStride()};
    detail::gemm_args args{packed->data(), group / 16, virtual_rows, xq, stride, sums, batch, acc};
    args.groups = kernel_groups;
    detail::ternary_gemm(kernels, args, packed->row_blocks() * kernel_groups, threads, detail::min_work_per_thread,
                         rescale.epilogue());
  }
};

/// The stack's layers with group scales (d around the per-tensor scale, varying per unit): binary16
/// values, as every model imported from GGUF or an FP16 folder has (half_scales), or floats that
/// are not (the fused kernel then reads 4-byte scales).
const std::vector<grouped_layer>& grouped_stack(bool half_scales) {
  const auto build = [](bool half) {
    std::vector<grouped_layer> layers;
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> spread(0.5f, 1.5f);
    for (const auto& layer : stack::instance().layers) {
      grouped_layer g{&layer.packed_weight(), Matrix<float>(layer.out_features(), layer.in_features() / 128),
                      bitnet::Vector<float>::Constant(layer.out_features(), 0.01f), {}};
      for (Index i = 0; i < g.d.size(); ++i) {
        const float value = 0.02f * spread(rng);
        g.d.data()[i] = half ? float(*bitnet::detail::round_to_format(value, bitnet::detail::binary16)) : value;
      }
      g.kernel_scales = bitnet::detail::kernel_unit_scales(g.d.data(), g.d.rows(), g.d.cols(), g.d.cols());
      layers.push_back(std::move(g));
    }
    return layers;
  };
  if (half_scales) {
    static const std::vector<grouped_layer> half = build(true);
    return half;
  }
  static const std::vector<grouped_layer> single = build(false);
  return single;
}

/// Activations for each input width and outputs for each output width of the stack.
struct buffers {
  Matrix<float> x_hidden, x_intermediate, y_hidden, y_kv, y_intermediate;
  explicit buffers(Index batch)
      : x_hidden(random_matrix(batch, hidden, 3)),
        x_intermediate(random_matrix(batch, intermediate, 4)),
        y_hidden(batch, hidden),
        y_kv(batch, kv_width),
        y_intermediate(batch, intermediate) {}
  const Matrix<float>& input(Index in) const { return in == hidden ? x_hidden : x_intermediate; }
  Matrix<float>& output(Index out) { return out == hidden ? y_hidden : out == kv_width ? y_kv : y_intermediate; }
};

void decode_stack(benchmark::State& state) {
  const Index batch = state.range(0);
  const int threads = int(state.range(1));
  const stack& s = stack::instance();
  bitnet::set_num_threads(threads);
  buffers io(batch);
  const floor_read floor{&s, threads};
  double stack_seconds = 0, floor_seconds = 0;
  for (auto _ : state) {
    floor_seconds += floor.seconds();
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& layer : s.layers) layer.forward(io.input(layer.in_features()), io.output(layer.out_features()));
    const auto t1 = std::chrono::steady_clock::now();
    benchmark::ClobberMemory();
    const double seconds = std::chrono::duration<double>(t1 - t0).count();
    state.SetIterationTime(seconds);
    stack_seconds += seconds;
  }
  const double n = double(state.iterations());
  state.counters["floor_ms"] = 1e3 * floor_seconds / n;
  state.counters["ms_per_token"] = 1e3 * stack_seconds / n / double(batch);
  state.counters["ratio_to_floor"] = stack_seconds / floor_seconds;
  state.counters["tokens_per_s"] = n * double(batch) / stack_seconds;
  state.counters["GB_per_s"] = n * double(s.bytes) / stack_seconds / 1e9;
  state.counters["floor_GB_per_s"] = n * double(s.bytes) / floor_seconds / 1e9;
  state.counters["packed_MB"] = double(s.bytes) / 1e6;
  state.SetLabel(std::string(bitnet::isa_name(bitnet::active_isa())));
  bitnet::set_num_threads(0);
}

void decode_group128(benchmark::State& state) {
  const Index batch = state.range(0);
  const int threads = int(state.range(1));
  const bool per_block = state.range(2) != 0, half_scales = state.range(3) == 0;
  const stack& s = stack::instance();
  const std::vector<grouped_layer>& grouped = grouped_stack(half_scales);
  bitnet::set_num_threads(threads);
  buffers io(batch);
  double tensor_seconds = 0, group_seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& layer : s.layers) layer.forward(io.input(layer.in_features()), io.output(layer.out_features()));
    const auto t1 = std::chrono::steady_clock::now();
    for (const auto& layer : grouped) layer.forward(io.input(layer.in()), io.output(layer.out()), per_block);
    const auto t2 = std::chrono::steady_clock::now();
    benchmark::ClobberMemory();
    tensor_seconds += std::chrono::duration<double>(t1 - t0).count();
    const double seconds = std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(seconds);
    group_seconds += seconds;
  }
  const double n = double(state.iterations());
  state.counters["tensor_ms"] = 1e3 * tensor_seconds / n;
  state.counters["group_ms"] = 1e3 * group_seconds / n;
  state.counters["group_to_tensor"] = group_seconds / tensor_seconds;
  state.counters["ms_per_token"] = 1e3 * group_seconds / n / double(batch);
  double scale_bytes = 0;
  for (const auto& layer : grouped) scale_bytes += layer.scale_bytes(batch, per_block);
  state.counters["bytes_ratio"] = (double(s.bytes) + scale_bytes) / double(s.bytes);
  state.SetLabel(std::string(bitnet::isa_name(bitnet::active_isa())) + (per_block ? " per_block" : " per_token") +
                 (grouped_layer::fused(batch, per_block) ? " fused" : " virtual blocks") +
                 (half_scales ? " binary16 d" : " float d"));
  bitnet::set_num_threads(0);
}

void layer_hot_group128(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const bool per_block = state.range(4) != 0;
  bitnet::set_num_threads(int(state.range(3)));
  const grouped_layer* layer = nullptr;
  for (const auto& l : grouped_stack(state.range(5) == 0))
    if (l.out() == out && l.in() == in) {
      layer = &l;
      break;
    }
  buffers io(batch);
  for (auto _ : state) {
    layer->forward(io.input(in), io.output(out), per_block);
    benchmark::ClobberMemory();
  }
  state.counters["MAC/s"] = benchmark::Counter(double(out * in * batch), benchmark::Counter::kIsIterationInvariantRate);
  bitnet::set_num_threads(0);
}

void decode_base3(benchmark::State& state) {
  const Index batch = state.range(0);
  const int threads = int(state.range(1));
  const stack& two_bit = stack::instance();
  const stack& base3 = stack::base3();
  bitnet::set_num_threads(threads);
  buffers io(batch);
  const floor_read floor_two_bit{&two_bit, threads}, floor_base3{&base3, threads};
  double two_bit_seconds = 0, base3_seconds = 0, floor_two_bit_seconds = 0, floor_base3_seconds = 0;
  const auto run = [&](const stack& s) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& layer : s.layers) layer.forward(io.input(layer.in_features()), io.output(layer.out_features()));
    const auto t1 = std::chrono::steady_clock::now();
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(t1 - t0).count();
  };
  for (auto _ : state) {
    floor_two_bit_seconds += floor_two_bit.seconds();
    two_bit_seconds += run(two_bit);
    floor_base3_seconds += floor_base3.seconds();
    const double seconds = run(base3);
    state.SetIterationTime(seconds);
    base3_seconds += seconds;
  }
  const double n = double(state.iterations());
  state.counters["two_bit_ms"] = 1e3 * two_bit_seconds / n;
  state.counters["base3_ms"] = 1e3 * base3_seconds / n;
  state.counters["speedup"] = two_bit_seconds / base3_seconds;
  state.counters["floor_two_bit_ms"] = 1e3 * floor_two_bit_seconds / n;
  state.counters["floor_base3_ms"] = 1e3 * floor_base3_seconds / n;
  state.counters["two_bit_to_floor"] = two_bit_seconds / floor_two_bit_seconds;
  state.counters["base3_to_floor"] = base3_seconds / floor_base3_seconds;
  state.counters["bytes_ratio"] = double(base3.bytes) / double(two_bit.bytes);
  state.counters["base3_MB"] = double(base3.bytes) / 1e6;
  state.SetLabel(std::string(bitnet::isa_name(bitnet::active_isa())));
  bitnet::set_num_threads(0);
}

/// The first base-3 layer of this shape, run again and again: its weights stay in cache.
void layer_hot_base3(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  bitnet::set_num_threads(int(state.range(3)));
  const bitnet::BitLinear<float>* layer = nullptr;
  for (const auto& l : stack::base3().layers)
    if (l.out_features() == out && l.in_features() == in) {
      layer = &l;
      break;
    }
  buffers io(batch);
  for (auto _ : state) {
    layer->forward(io.input(in), io.output(out));
    benchmark::ClobberMemory();
  }
  state.counters["MAC/s"] = benchmark::Counter(double(out * in * batch), benchmark::Counter::kIsIterationInvariantRate);
  bitnet::set_num_threads(0);
}

void read_floor(benchmark::State& state) {
  const stack& s = stack::instance();
  const floor_read floor{&s, int(state.range(0))};
  for (auto _ : state) state.SetIterationTime(floor.seconds());
  state.counters["GB_per_s"] = benchmark::Counter(double(s.bytes) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// The first layer of the stack of this shape, run again and again: its weights stay in cache.
void layer_hot(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const stack& s = stack::instance();
  bitnet::set_num_threads(int(state.range(3)));
  const bitnet::BitLinear<float>* layer = nullptr;
  for (const auto& l : s.layers)
    if (l.out_features() == out && l.in_features() == in) {
      layer = &l;
      break;
    }
  buffers io(batch);
  for (auto _ : state) {
    layer->forward(io.input(in), io.output(out));
    benchmark::ClobberMemory();
  }
  state.counters["MAC/s"] = benchmark::Counter(double(out * in * batch), benchmark::Counter::kIsIterationInvariantRate);
  bitnet::set_num_threads(0);
}

}  // namespace

int main(int argc, char** argv) {
  for (Index threads : {1, 2})
    benchmark::RegisterBenchmark("read_floor", read_floor)->Arg(threads)->UseManualTime()->Unit(benchmark::kMillisecond);
  for (Index batch : {1, 8, 32})
    for (Index threads : {1, 2})
      benchmark::RegisterBenchmark("decode_stack", decode_stack)
          ->Args({batch, threads})
          ->UseManualTime()
          ->MinTime(batch == 1 ? 2.0 : 1.0)
          ->Unit(benchmark::kMillisecond);
  for (Index float_scales : {0, 1})
    for (Index per_block : {0, 1})
      for (Index batch : {1, 8})
        for (Index threads : {1, 2})
          if (float_scales == 0 || (batch == 1 && per_block == 0))
            benchmark::RegisterBenchmark("decode_group128", decode_group128)
                ->Args({batch, threads, per_block, float_scales})
                ->UseManualTime()
                ->MinTime(batch == 1 ? 2.0 : 1.0)
                ->Unit(benchmark::kMillisecond);
  for (Index batch : {1, 8})
    for (Index threads : {1, 2})
      benchmark::RegisterBenchmark("decode_base3", decode_base3)
          ->Args({batch, threads})
          ->UseManualTime()
          ->MinTime(batch == 1 ? 2.0 : 1.0)
          ->Unit(benchmark::kMillisecond);
  for (const shape& sh : {shape{hidden, hidden}, shape{kv_width, hidden}, shape{intermediate, hidden}, shape{hidden, intermediate}})
    for (Index batch : {1, 8, 32})
      for (Index threads : {1, 2}) {
        benchmark::RegisterBenchmark("layer_hot", layer_hot)
            ->Args({sh.out, sh.in, batch, threads})
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark("layer_hot_base3", layer_hot_base3)
            ->Args({sh.out, sh.in, batch, threads})
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark("layer_hot_group128", layer_hot_group128)
            ->Args({sh.out, sh.in, batch, threads, 0, 0})
            ->Unit(benchmark::kMicrosecond);
      }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
