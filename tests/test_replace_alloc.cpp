// replace_linear under allocation failure: the n-th allocation throws std::bad_alloc, for every n
// from 1 until a run succeeds, and after each failure the graph must be bit-identical.
//
// Its own executable because it replaces the global operator new (std::string, std::vector, the
// pending layers ...) and routes Eigen's allocations through the same counter (alloc_fault.hpp).
#include "alloc_fault.hpp"  // first: it configures Eigen

#include <new>

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <bitnet/replace.hpp>

#include "graph_fixtures.hpp"

using namespace fixtures;

namespace {

struct armed_scope {
  explicit armed_scope(long fail) {
    alloc_fault::allocations = 0;
    alloc_fault::fail_at = fail;
    alloc_fault::armed = true;
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~armed_scope() {
    alloc_fault::armed = false;
    Eigen::internal::set_is_malloc_allowed(true);
  }
};

// Runs replace_linear on fresh graphs, failing allocation 1, 2, ... until a run succeeds; returns
// how many failure points were exercised. make() builds the graph, state() snapshots it.
template <class Policy, class Make, class State>
long fail_every_allocation(Make make, State state, bool dry_run) {
  bitnet::replace_options options;
  options.dry_run = dry_run;
  long total = 0;
  {
    auto graph = make();
    armed_scope counting(0);
    bitnet::replace_linear<Policy>(*graph, options);
    total = alloc_fault::allocations;
  }
  REQUIRE(total > 0);
  for (long n = 1; n <= total + 1; ++n) {
    CAPTURE(n);
    auto graph = make();
    const auto before = state(*graph);
    bool failed = false;
    try {
      armed_scope failing(n);
      bitnet::replace_linear<Policy>(*graph, options);
    } catch (const std::bad_alloc&) {
      failed = true;
    }
    CHECK(failed == (n <= total));
    if (failed || dry_run)
      CHECK(state(*graph) == before);
    else
      CHECK(state(*graph) != before);
  }
  return total;
}

}  // namespace

TEST_CASE_TEMPLATE("replace_linear: every allocation failure leaves a variant graph bit-identical", Policy,
                   bitnet::transfer::copy, bitnet::transfer::move, bitnet::transfer::checked) {
  const auto make = [] { return std::make_unique<transformer>(make_transformer(2, 5, 21)); };
  const auto state = [](transformer& t) { return snapshot(t); };
  for (bool dry_run : {false, true}) {
    CAPTURE(dry_run);
    MESSAGE("allocation points: ", fail_every_allocation<Policy>(make, state, dry_run));
  }
}

TEST_CASE_TEMPLATE("replace_linear: every allocation failure leaves a polymorphic module tree bit-identical", Policy,
                   bitnet::transfer::copy, bitnet::transfer::move, bitnet::transfer::checked) {
  const auto make = [] { return make_module_tree(22); };
  const auto state = [](module& root) { return snapshot(root); };
  MESSAGE("allocation points: ", fail_every_allocation<Policy>(make, state, false));
}

TEST_CASE("the allocation counter sees Eigen's allocations and operator new") {
  long eigen = 0, std_new = 0;
  {
    armed_scope counting(0);
    bitnet::Matrix<float> m(3, 3);
    eigen = alloc_fault::allocations;
    std::string s(100, 'x');
    std_new = alloc_fault::allocations - eigen;
  }
  CHECK(eigen == 1);
  CHECK(std_new == 1);
  CHECK_THROWS_AS((armed_scope(1), bitnet::Matrix<float>(4, 4)), std::bad_alloc);
}
