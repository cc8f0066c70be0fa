// load_state_dict and save_state_dict under allocation failure: the n-th allocation throws std::bad_alloc, for every n
// from 1 until a load succeeds (opening the file and parsing its header, walking the graph, checking
// keys, reading and converting tensors, building the BitLinear layers), and after each failure the
// graph must be bit-identical; likewise every failure of a save must leave the file it replaces
// byte-identical. Its own executable because it replaces the global operator new (alloc_fault.hpp).
//
// The JSON header is covered too: the reader and the writer build no nlohmann::json tree (whose
// destructor allocates in nlohmann/json 3.11, so a failure there used to end in std::terminate).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "alloc_fault.hpp"  // first: it configures Eigen

#include <filesystem>
#include <fstream>
#include <iterator>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <bitnet/replace.hpp>
#include <bitnet/state_dict.hpp>

#include "graph_fixtures.hpp"

using namespace fixtures;
namespace fs = std::filesystem;
using alloc_fault::armed_scope;

namespace {

fs::path scratch_file(const std::string& name) {
  std::random_device rd;
  return fs::temp_directory_path() / ("bitnet_state_dict_alloc_" + std::to_string(rd()) + "_" + name);
}

// Opens `path` and loads it into fresh graphs from make(), failing allocation 1, 2, ... until a
// load succeeds.
template <class Make>
long fail_every_allocation(Make make, const fs::path& path, const bitnet::state_dict_options& options) {
  const auto load = [&](auto& graph) { bitnet::load_state_dict(graph, path, options); };
  return alloc_fault::fail_every_allocation(make, load, [](auto& graph) { return snapshot(graph); });
}

}  // namespace

TEST_CASE("load_state_dict: every allocation failure leaves the graph bit-identical") {
  const fs::path file = scratch_file("t.safetensors");
  for (const bool converted : {false, true}) {
    CAPTURE(converted);
    const auto make = [converted] {
      auto graph = std::make_unique<transformer>(make_transformer(1, 5, 31));
      if (converted) bitnet::replace_linear(*graph);
      return graph;
    };
    {
      auto source = std::make_unique<transformer>(make_transformer(1, 5, 32));
      if (converted) bitnet::replace_linear(*source);
      bitnet::save_state_dict(*source, file, {.metadata = {{"format", "pt"}, {"note", "parsed under failures"}}});
    }
    MESSAGE("allocation points: ", fail_every_allocation(make, file, {}));
  }
  fs::remove(file);
}

TEST_CASE("load_state_dict: every allocation failure leaves a module tree bit-identical (packed form)") {
  const fs::path file = scratch_file("tree.safetensors");
  const bitnet::state_dict_options options{.bit_linear = bitnet::bit_linear_storage::hf_packed,
                                           .metadata = {{"format", "pt"}}};
  const auto make = [] {
    auto tree = make_module_tree(33);
    bitnet::replace_linear(*tree);
    return tree;
  };
  auto converted = make_module_tree(35);
  bitnet::replace_linear(*converted);
  bitnet::save_state_dict(*converted, file, options);
  MESSAGE("allocation points: ", fail_every_allocation(make, file, options));
  fs::remove(file);
}

namespace {

std::vector<char> file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Temporary files the writer left next to `path` (it must remove them on failure).
int leftovers(const fs::path& path) {
  int count = 0;
  for (const fs::directory_entry& entry : fs::directory_iterator(path.parent_path()))
    count += entry.path().filename().string().starts_with(path.filename().string() + ".tmp-");
  return count;
}

}  // namespace

TEST_CASE("save_state_dict: every allocation failure leaves the file it replaces byte-identical") {
  const fs::path file = scratch_file("save.safetensors");
  for (const auto storage : {bitnet::bit_linear_storage::latent, bitnet::bit_linear_storage::hf_packed}) {
    CAPTURE(int(storage));
    auto graph = std::make_unique<transformer>(make_transformer(1, 5, 36));
    bitnet::replace_linear(*graph);
    bitnet::save_state_dict(*graph, file, {.bit_linear = storage, .metadata = {{"format", "pt"}}});
    const std::vector<char> saved = file_bytes(file);
    // Another graph's weights, to replace the file with.
    auto other = std::make_unique<transformer>(make_transformer(1, 5, 37));
    bitnet::replace_linear(*other);
    const bitnet::state_dict_options options{.bit_linear = storage, .metadata = {{"format", "pt"}, {"n", "2"}}};
    long total = 0;
    {
      armed_scope counting(0);
      bitnet::save_state_dict(*other, file, options);
      total = alloc_fault::allocations;
    }
    const std::vector<char> replaced = file_bytes(file);
    REQUIRE(replaced != saved);
    long failures = 0;
    for (long n = 1; n <= total + 1; ++n) {
      CAPTURE(n);
      bitnet::save_state_dict(*graph, file, {.bit_linear = storage, .metadata = {{"format", "pt"}}});
      bool failed = false;
      try {
        armed_scope failing(n);
        bitnet::save_state_dict(*other, file, options);
      } catch (const std::bad_alloc&) {
        failed = true;
      }
      // A failed nothrow allocation (std::stable_sort's buffer) is not an error: the save succeeds.
      failures += failed;
      if (n > total) CHECK_FALSE(failed);
      CHECK(file_bytes(file) == (failed ? saved : replaced));
      CHECK(leftovers(file) == 0);
    }
    CHECK(failures == total - 1);  // all but the one nothrow allocation, the writer's stable_sort buffer
    MESSAGE("allocation points: ", total, ", failed saves: ", failures);
  }
  fs::remove(file);
}
