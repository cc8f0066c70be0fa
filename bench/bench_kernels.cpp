// Kernel-only throughput (no activation quantization, no rescale) and probes of the machine: the
// core clock (a chain of dependent imul), the peak rate of vpmaddubsw (the AVX2 kernels' only
// multiply) and the read bandwidth from L1, L2 and L3. Together they show how close the kernels get
// to the port limit, or (batch 1, weights from L3) to the rate at which the weights can be read.
// pool_handoff is the thread pool's fixed cost alone: a call of trivial parts, back to back as the
// layers of a model call it, against the same parts run on the calling thread.
#include <bitnet/bitnet.hpp>

#include <random>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using bitnet::Index;

void kernel(benchmark::State& state, bitnet::isa which) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> code(-1, 1), activation(-127, 127);
  bitnet::Matrix<std::int8_t> w(out, in);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = std::int8_t(code(rng));
  const bitnet::packed_ternary packed(w);
  bitnet::detail::aligned_vector<std::int8_t> x(std::size_t(batch * packed.padded_cols()));
  for (std::int8_t& v : x) v = std::int8_t(activation(rng));
  std::vector<std::int32_t> sums(static_cast<std::size_t>(batch)), acc(static_cast<std::size_t>(batch * out));
  const bitnet::detail::gemm_args args{packed.data(), packed.col_tiles(), out, x.data(), packed.padded_cols(),
                                       sums.data(), batch, acc.data()};
  for (auto _ : state) {
    bitnet::detail::ternary_gemm(which, args, packed.row_blocks(), int(state.range(3)));
    benchmark::DoNotOptimize(acc.data());
  }
  state.counters["MAC/s"] = benchmark::Counter(double(out * in * batch), benchmark::Counter::kIsIterationInvariantRate);
}

#if defined(__x86_64__)
// 4096 dependent imul per iteration, 3 cycles each, so 3 x imul/s is the clock. (A chain of
// immediate adds is not: Golden Cove folds several of them per cycle at rename.)
void clock_probe(benchmark::State& state) {
  long value = 1;
  for (auto _ : state) {
    for (int i = 0; i < 1024; ++i)
      __asm__ volatile("imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0" : "+r"(value));
  }
  state.counters["cycles/s"] = benchmark::Counter(3 * 4096.0, benchmark::Counter::kIsIterationInvariantRate);
}

// The read bandwidth the batch-1 kernels stream their weights at: a buffer of state.range(0)
// bytes summed with 512-bit loads, 4 independent accumulators, again and again (so from L1, L2 or
// L3 by its size).
__attribute__((target("avx512f"))) void read_probe(benchmark::State& state) {
  const std::size_t bytes = std::size_t(state.range(0));
  bitnet::detail::aligned_vector<std::int8_t> buffer(bytes, 1);
  for (auto _ : state) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (std::size_t i = 0; i < bytes; i += 256) {
      s0 = _mm512_add_epi32(s0, _mm512_load_si512(buffer.data() + i));
      s1 = _mm512_add_epi32(s1, _mm512_load_si512(buffer.data() + i + 64));
      s2 = _mm512_add_epi32(s2, _mm512_load_si512(buffer.data() + i + 128));
      s3 = _mm512_add_epi32(s3, _mm512_load_si512(buffer.data() + i + 192));
    }
    benchmark::DoNotOptimize(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
  }
  state.counters["bytes/s"] = benchmark::Counter(double(bytes), benchmark::Counter::kIsIterationInvariantRate);
}

// 12 independent vpmaddubsw per inner step (more than latency x ports), register operands only.
__attribute__((target("avx2"))) void maddubs_probe(benchmark::State& state) {
  __m256i a0 = _mm256_set1_epi8(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
          a9 = a0, a10 = a0, a11 = a0;
  const __m256i b = _mm256_set1_epi8(1);
  for (auto _ : state) {
    for (int i = 0; i < 256; ++i)
      __asm__ volatile(
          "vpmaddubsw %12, %0, %0\n\tvpmaddubsw %12, %1, %1\n\tvpmaddubsw %12, %2, %2\n\tvpmaddubsw %12, %3, %3\n\t"
          "vpmaddubsw %12, %4, %4\n\tvpmaddubsw %12, %5, %5\n\tvpmaddubsw %12, %6, %6\n\tvpmaddubsw %12, %7, %7\n\t"
          "vpmaddubsw %12, %8, %8\n\tvpmaddubsw %12, %9, %9\n\tvpmaddubsw %12, %10, %10\n\tvpmaddubsw %12, %11, %11"
          : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9),
            "+x"(a10), "+x"(a11)
          : "x"(b));
  }
  state.counters["maddubs/s"] = benchmark::Counter(256.0 * 12, benchmark::Counter::kIsIterationInvariantRate);
}

// The vpdpbusd port floor: 12 independent zmm vpdpbusd chains, register operands only (Zen 4 runs a
// 512-bit op as two 256-bit halves; Sapphire Rapids issues ~2 a cycle on ports 0 and 5).
__attribute__((target("avx512f,avx512vnni"))) void dpbusd_probe(benchmark::State& state) {
  __m512i a0 = _mm512_set1_epi8(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
          a9 = a0, a10 = a0, a11 = a0;
  const __m512i b = _mm512_set1_epi8(1);
  for (auto _ : state) {
    for (int i = 0; i < 256; ++i)
      __asm__ volatile(
          "vpdpbusd %12, %12, %0\n\tvpdpbusd %12, %12, %1\n\tvpdpbusd %12, %12, %2\n\tvpdpbusd %12, %12, %3\n\t"
          "vpdpbusd %12, %12, %4\n\tvpdpbusd %12, %12, %5\n\tvpdpbusd %12, %12, %6\n\tvpdpbusd %12, %12, %7\n\t"
          "vpdpbusd %12, %12, %8\n\tvpdpbusd %12, %12, %9\n\tvpdpbusd %12, %12, %10\n\tvpdpbusd %12, %12, %11"
          : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9),
            "+v"(a10), "+v"(a11)
          : "v"(b));
  }
  state.counters["dpbusd/s"] = benchmark::Counter(256.0 * 12, benchmark::Counter::kIsIterationInvariantRate);
}

// The batch-1 kernel's mix without memory: per 64 multiply-adds one vpandd and one vpdpbusd
// (8 chains), so its cost over dpbusd_probe is what the ANDs take from the multiply ports.
__attribute__((target("avx512f,avx512vnni"))) void and_dpbusd_probe(benchmark::State& state) {
  __m512i a0 = _mm512_set1_epi8(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, t0 = a0, t1 = a0;
  const __m512i b = _mm512_set1_epi8(1), m = _mm512_set1_epi8(3);
  for (auto _ : state) {
    for (int i = 0; i < 256; ++i)
      __asm__ volatile(
          "vpandd %10, %11, %8\n\tvpdpbusd %10, %8, %0\n\tvpandd %10, %11, %9\n\tvpdpbusd %10, %9, %1\n\t"
          "vpandd %10, %11, %8\n\tvpdpbusd %10, %8, %2\n\tvpandd %10, %11, %9\n\tvpdpbusd %10, %9, %3\n\t"
          "vpandd %10, %11, %8\n\tvpdpbusd %10, %8, %4\n\tvpandd %10, %11, %9\n\tvpdpbusd %10, %9, %5\n\t"
          "vpandd %10, %11, %8\n\tvpdpbusd %10, %8, %6\n\tvpandd %10, %11, %9\n\tvpdpbusd %10, %9, %7"
          : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(t0), "+v"(t1)
          : "v"(b), "v"(m));
  }
  state.counters["dpbusd/s"] = benchmark::Counter(256.0 * 8, benchmark::Counter::kIsIterationInvariantRate);
}
#endif

// thread_pool::run of range(0) parts of range(2) dependent multiplies each (about 3 cycles apiece:
// long enough that a spinning worker takes its share), against range(1) = 0: the same parts run
// one after another on the calling thread. At 2 parts on 2 cores the difference between the 2-part
// call and half the serial loop is the hand-off. "helped" is the share of parts a worker ran.
void pool_handoff(benchmark::State& state) {
  const Index parts = state.range(0);
  struct alignas(64) part_record {
    std::uint64_t value = 1;
    std::thread::id ran_on;
    std::int64_t runs = 0;
    std::int64_t chain = 0;
  };
  std::vector<part_record> records(static_cast<std::size_t>(parts));
  for (part_record& r : records) r.chain = state.range(2);
  const auto work = [](const void* context, Index part) {
    part_record& r = const_cast<part_record*>(static_cast<const part_record*>(context))[part];
    std::uint64_t v = r.value;
    for (std::int64_t i = 0; i < r.chain; ++i) {
      v = v * 0x9E3779B97F4A7C15ull + 1;
      benchmark::DoNotOptimize(v);
    }
    r.value = v;
    r.ran_on = std::this_thread::get_id();
    ++r.runs;
  };
  auto& pool = bitnet::detail::thread_pool::instance();
  pool.run(parts, work, records.data());  // the workers exist before the timing starts
  const std::thread::id caller = std::this_thread::get_id();
  std::int64_t helped = 0;
  for (auto _ : state) {
    if (state.range(1) != 0) {
      pool.run(parts, work, records.data());
      for (const part_record& r : records) helped += r.ran_on != caller;
    } else {
      for (Index part = 0; part < parts; ++part) work(records.data(), part);
    }
  }
  for (const part_record& r : records)
    if (r.runs != std::int64_t(state.iterations()) + 1) state.SkipWithError("a part ran twice or never");
  state.counters["helped"] = double(helped) / double(parts * std::int64_t(state.iterations()));
}

}  // namespace

int main(int argc, char** argv) {
#if defined(__x86_64__)
  benchmark::RegisterBenchmark("clock_probe", clock_probe);
  if (bitnet::isa_supported(bitnet::isa::avx2)) benchmark::RegisterBenchmark("maddubs_probe", maddubs_probe);
  // 32 KiB (L1), 1 MiB (L2), 4.4 MB (a 6912 x 2560 layer's packed weights: L3 on most CPUs)
  if (bitnet::isa_supported(bitnet::isa::avx512)) {
    benchmark::RegisterBenchmark("dpbusd_probe", dpbusd_probe);
    benchmark::RegisterBenchmark("and_dpbusd_probe", and_dpbusd_probe);
  }
  if (bitnet::isa_supported(bitnet::isa::avx512))
    for (long bytes : {32L << 10, 1L << 20, 6912L * 2560 / 4}) benchmark::RegisterBenchmark("read_probe", read_probe)->Arg(bytes);
#endif
  // 0 and about 0.3, 1 and 3 us per part
  for (Index chain : {0, 300, 1000, 3000}) {
    benchmark::RegisterBenchmark("pool_handoff", pool_handoff)->Args({2, 0, chain})->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("pool_handoff", pool_handoff)->Args({2, 1, chain})->Unit(benchmark::kMicrosecond);
  }
  benchmark::RegisterBenchmark("pool_handoff", pool_handoff)->Args({4, 1, 1000})->Unit(benchmark::kMicrosecond);
  using bitnet::isa;
  for (isa which : {isa::avx2, isa::avx512, isa::amx, isa::neon, isa::dotprod, isa::i8mm}) {
    if (!bitnet::isa_supported(which)) continue;
    const std::string name = "kernel_" + std::string(bitnet::isa_name(which));
    // L2-resident weights (128 rows) and the model's 6912 x 2560 (from L3); batch 1 (decode), 32 and
    // 128 (prefill: against dpbusd_probe's port floor).
    for (Index out : {128, 640, 6912})
      for (Index batch : {1, 32, 128})
        benchmark::RegisterBenchmark(name.c_str(), kernel, which)->Args({out, 2560, batch, 1})->Unit(benchmark::kMicrosecond);
    // The k / v projection at batch 1 split over two threads: the hand-off's share of a real call.
    benchmark::RegisterBenchmark(name.c_str(), kernel, which)->Args({640, 2560, 1, 2})->Unit(benchmark::kMicrosecond);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
