// replace_linear under allocation failure: the n-th allocation throws std::bad_alloc, for every n
// from 1 until a run succeeds, and after each failure the graph must be bit-identical.
//
// Its own executable because it replaces the global operator new (std::string, std::vector, the
// pending layers ...) and routes Eigen's allocations through the same counter (alloc_fault.hpp).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "alloc_fault.hpp"  // first: it configures Eigen

#include <new>

#include <doctest/doctest.h>

#include <bitnet/replace.hpp>

#include "graph_fixtures.hpp"

using namespace fixtures;

using alloc_fault::armed_scope;
using alloc_fault::fail_every_allocation;

TEST_CASE_TEMPLATE("replace_linear: every allocation failure leaves a variant graph bit-identical", Policy,
                   POLICIES) {
  const auto make = [] { return std::make_unique<transformer>(make_transformer(2, 5, 21)); };
  const auto state = [](transformer& t) { return snapshot(t); };
  for (bool dry_run : {false, true}) {
    CAPTURE(dry_run);
    bitnet::replace_options options;
    options.dry_run = dry_run;
    const auto run = [&options](transformer& t) { bitnet::replace_linear<Policy>(t, options); };
    MESSAGE("allocation points: ", fail_every_allocation(make, run, state, !dry_run));
  }
}

TEST_CASE_TEMPLATE("replace_linear: every allocation failure leaves a polymorphic module tree bit-identical", Policy,
                   POLICIES) {
  const auto make = [] { return make_module_tree(22); };
  const bitnet::replace_options options;
  const auto run = [&options](module& root) { bitnet::replace_linear<Policy>(root, options); };
  const auto state = [](module& root) { return snapshot(root); };
  MESSAGE("allocation points: ", fail_every_allocation(make, run, state));
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
