// Inference with packed ternary weights: release the latent weights, see which kernels run, run a
// decode step (batch 4) and a prefill (batch 32: AMX tiles where the CPU has them) into reused
// outputs, and check that forcing another kernel ISA or thread count gives the same bits.
#include <bitnet/bitnet.hpp>

#include <cstdio>
#include <random>

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  bitnet::Matrix<float> w(640, 2560);
  for (bitnet::Index i = 0; i < w.size(); ++i) w.data()[i] = normal(rng);
  bitnet::Matrix<float> x(4, 2560);
  for (bitnet::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng) * 50.0f;

  bitnet::BitLinear<float> layer(w, bitnet::Vector<float>::Zero(640));
  std::printf("with latent weights: %zu bytes\n", layer.memory_bytes());
  layer.release_latent_weights();  // inference only from here on
  std::printf("inference only:      %zu bytes (%.2f bits per weight)\n", layer.memory_bytes(),
              double(layer.packed_weight().size_bytes()) * 8.0 / double(w.size()));

  const bitnet::Matrix<float> y = layer.forward(x);
  std::printf("kernels: %s (best on this CPU: %s), threads: %d\n", bitnet::isa_name(bitnet::last_isa()).data(),
              bitnet::isa_name(bitnet::best_isa()).data(), bitnet::num_threads());

  // An engine's loop: forward(x, out) writes into a matrix it keeps, so once a shape has been seen
  // a call allocates nothing (the scratch memory is this thread's and is reused).
  bitnet::Matrix<float> prompt(32, 2560), decoded, prefilled;
  for (bitnet::Index i = 0; i < prompt.size(); ++i) prompt.data()[i] = normal(rng) * 50.0f;
  for (int step = 0; step < 3; ++step) {
    layer.forward(prompt, prefilled);
    layer.forward(x, decoded);
  }
  std::printf("prefill of 32 tokens -> %ld x %ld, decode of 4 -> %ld x %ld\n", long(prefilled.rows()),
              long(prefilled.cols()), long(decoded.rows()), long(decoded.cols()));

  bitnet::force_isa(bitnet::isa::scalar);  // or run with BITNET_ISA=scalar
  bitnet::set_num_threads(1);              // or run with BITNET_NUM_THREADS=1
  const bool same = layer.forward(x) == y && decoded == y && layer.forward(prompt) == prefilled;
  bitnet::clear_forced_isa();
  bitnet::set_num_threads(0);
  std::printf("scalar, 1 thread: %s\n", same ? "bit-identical" : "DIFFERENT");

  try {
    (void)layer.weight();
  } catch (const bitnet::state_error& e) {
    std::printf("weight(): %s\n", e.what());
  }
  return same ? 0 : 1;
}
