// BitLinear::forward's steady state allocates nothing: its scratch memory (quantized activations,
// scales, accumulators, interleaved token tiles, AMX tiles) is the calling thread's and is reused,
// the thread pool queues without allocating, and forward(x, y) writes into y. Counted with the
// replaced global operator new and Eigen's allocation hook (alloc_fault.hpp), so its own executable.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "alloc_fault.hpp"  // first: it configures Eigen

#include <new>
#include <random>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <bitnet/bit_linear.hpp>

#include "reference.hpp"

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;

namespace {

std::vector<bitnet::isa> runnable_isas() {
  std::vector<bitnet::isa> isas;
  for (bitnet::isa which : bitnet::all_isas)
    if (bitnet::isa_supported(which)) isas.push_back(which);
  return isas;
}

}  // namespace

TEST_CASE("BitLinear::forward: no allocation once a shape has been seen, on every ISA and thread count") {
  std::mt19937 rng(47);
  for (bool rms_norm : {false, true}) {
    bitnet::bitlinear_options options;
    options.rms_norm = rms_norm;
    // 96 x 2048 at batch 33 is enough work for two threads.
    const BitLinear<float> layer(reference::random_matrix<float>(96, 2048, rng, 0.05),
                                 reference::random_matrix<float>(96, 1, rng), options);
    for (bitnet::isa which : runnable_isas())
      for (int threads : {1, 2})
        for (Index batch : {1, 3, 8, 33}) {
          CAPTURE(bitnet::isa_name(which));
          CAPTURE(threads);
          CAPTURE(batch);
          CAPTURE(rms_norm);
          bitnet::force_isa(which);
          bitnet::set_num_threads(threads);
          const Matrix<float> x = reference::random_matrix<float>(batch, 2048, rng, 4.0);
          Matrix<float> y;
          layer.forward(x, y);  // first call of this shape: scratch grows, the pool starts
          const Matrix<float> first = y;
          long allocations = 0;
          {
            alloc_fault::armed_scope counting(0);
            for (int call = 0; call < 3; ++call) layer.forward(x, y);
            allocations = alloc_fault::allocations;
          }
          CHECK(allocations == 0);
          CHECK(y == first);
        }
  }
  bitnet::clear_forced_isa();
  bitnet::set_num_threads(0);
}

TEST_CASE("BitLinear::forward: batch 1 split over threads (every part quantizing the token) allocates nothing") {
  std::mt19937 rng(49);
  using bitnet::weight_scaling;
  // 640 x 2560: 1.6M multiply-adds, three parts of more than min_work_per_thread each.
  const bitnet::bitlinear_options layouts[] = {
      {},
      {.storage = bitnet::weight_storage::base3},
      {.weight_scales = weight_scaling::per_row},
      {.weight_scales = weight_scaling::per_group, .group_size = 128},  // the fused kernel on AVX-512
      {.weight_scales = weight_scaling::per_group, .group_size = 128,
       .activation_scales = bitnet::activation_scaling::per_block},
  };
  for (const bitnet::bitlinear_options& options : layouts) {
    const BitLinear<float> layer(reference::random_matrix<float>(640, 2560, rng, 0.05),
                                 reference::random_matrix<float>(640, 1, rng), options);
    const Matrix<float> x = reference::random_matrix<float>(1, 2560, rng, 4.0);
    for (bitnet::isa which : runnable_isas())
      for (int threads : {2, 3}) {
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(threads);
        CAPTURE(int(options.weight_scales));
        bitnet::force_isa(which);
        bitnet::set_num_threads(threads);
        Matrix<float> y;
        layer.forward(x, y);  // first call of this shape: scratch grows, the pool starts
        const Matrix<float> first = y;
        long allocations = 0;
        {
          alloc_fault::armed_scope counting(0);
          for (int call = 0; call < 3; ++call) layer.forward(x, y);
          allocations = alloc_fault::allocations;
        }
        CHECK(allocations == 0);
        CHECK(y == first);
      }
  }
  bitnet::clear_forced_isa();
  bitnet::set_num_threads(0);
}

TEST_CASE("BitLinear::forward: a failed scratch allocation throws bad_alloc, leaves y as it was, and the next call works") {
  std::mt19937 rng(48);
  const BitLinear<float> layer(reference::random_matrix<float>(50, 300, rng, 0.05));
  for (bitnet::isa which : runnable_isas()) {
    CAPTURE(bitnet::isa_name(which));
    bitnet::force_isa(which);
    bitnet::set_num_threads(1);
    // A batch no earlier call on this thread used, so forward must grow its scratch buffers.
    const Index batch = 400 + Index(which) * 17;
    const Matrix<float> x = reference::random_matrix<float>(batch, 300, rng, 2.0);
    const Matrix<float> before = Matrix<float>::Constant(2, 2, 7.0f);
    Matrix<float> y = before;
    long failures = 0;
    for (long n = 1;; ++n) {
      bool failed = false;
      {
        alloc_fault::armed_scope failing(n);
        try {
          layer.forward(x, y);
        } catch (const std::bad_alloc&) {
          failed = true;
        }
      }
      if (!failed) break;
      ++failures;
      CHECK(y == before);
    }
    CHECK(failures >= 1);
    bitnet::set_num_threads(0);
    Matrix<float> expected;
    bitnet::force_isa(bitnet::isa::scalar);
    layer.forward(x, expected);
    CHECK(y == expected);
  }
  bitnet::clear_forced_isa();
}

TEST_CASE("BitLinear::forward: batch 1 split over threads: a failed scratch growth throws bad_alloc, y as it was") {
  std::mt19937 rng(50);
  const BitLinear<float> layer(reference::random_matrix<float>(640, 2560, rng, 0.05));
  const Matrix<float> x = reference::random_matrix<float>(1, 2560, rng, 2.0);
  bitnet::set_num_threads(2);
  for (bitnet::isa which : runnable_isas()) {
    CAPTURE(bitnet::isa_name(which));
    bitnet::force_isa(which);
    Matrix<float> expected;
    layer.forward(x, expected);  // the pool's workers exist from here on
    // A fresh thread: its scratch (accumulators, the parts' token blocks) must grow in the call.
    std::thread([&] {
      const Matrix<float> before = Matrix<float>::Constant(1, 640, 7.0f);
      Matrix<float> y = before;
      long failures = 0;
      for (long n = 1;; ++n) {
        bool failed = false;
        {
          alloc_fault::armed_scope failing(n);
          try {
            layer.forward(x, y);
          } catch (const std::bad_alloc&) {
            failed = true;
          }
        }
        if (!failed) break;
        ++failures;
        CHECK(y == before);
      }
      CHECK(failures >= 1);
      CHECK(y == expected);
    }).join();
  }
  bitnet::clear_forced_isa();
  bitnet::set_num_threads(0);
}
