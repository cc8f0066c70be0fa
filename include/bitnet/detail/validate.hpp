// Input checks shared by the public functions: each throws a bitnet error naming what and where.
#pragma once

#include <charconv>
#include <cmath>
#include <string>
#include <string_view>

#include <Eigen/Core>

#include "../errors.hpp"

namespace bitnet::detail {

inline std::string shape_string(Eigen::Index rows, Eigen::Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

/// The shortest text that reads back as exactly v (so two values an error says differ print differently).
template <class S>
std::string format_value(S v) {
  char text[64];
  const auto [end, ec] = std::to_chars(text, text + sizeof text, v);
  return ec == std::errc{} ? std::string(text, end) : std::to_string(v);
}

template <class Derived>
void require_non_empty(const Eigen::DenseBase<Derived>& m, std::string_view what) {
  if (m.rows() == 0 || m.cols() == 0)
    throw shape_error(std::string(what) + ": empty (" + shape_string(m.rows(), m.cols()) + ")");
}

/// Throws value_error naming the first non-finite element. Reads by coefficient, so it also works
/// on lazy expressions; callers pass evaluated matrices on hot paths.
template <class Derived>
void require_finite(const Eigen::DenseBase<Derived>& m, std::string_view what) {
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c) {
      const auto v = m.coeff(r, c);
      if (!std::isfinite(v)) {
        std::string msg(what);
        msg += ": non-finite value (";
        msg += std::isnan(v) ? "nan" : (v > 0 ? "+inf" : "-inf");
        msg += ")";
        if (m.cols() == 1)
          msg += " at index " + std::to_string(r);
        else
          msg += " at row " + std::to_string(r) + ", column " + std::to_string(c);
        throw value_error(msg);
      }
    }
}

}  // namespace bitnet::detail
