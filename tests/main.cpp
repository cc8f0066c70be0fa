// Debian's doctest package exports doctest::doctest only (no doctest_with_main).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
