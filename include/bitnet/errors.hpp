// bitnet/errors.hpp - the exception hierarchy of the library.
//
// Every public function reports bad input with one of these types. Messages say what is wrong
// and where (a layer path, a tensor name, a file, a row/column), so a user can act on them.
#pragma once

#include <stdexcept>
#include <string>

namespace bitnet {

/// Base of every exception thrown by bitnet.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A matrix or vector has the wrong dimensions (or is empty).
class shape_error : public error {
 public:
  using error::error;
};

/// A value is out of the domain: NaN, infinity, or an option outside its range.
class value_error : public error {
 public:
  using error::error;
};

/// The object no longer holds what the call needs (e.g. a BitLinear whose latent weights
/// were released for inference asked for them).
class state_error : public error {
 public:
  using error::error;
};

/// A layer-graph transfer (replace_linear) failed; the graph is left unchanged.
class transfer_error : public error {
 public:
  using error::error;
};

/// Reading or writing a file failed or the file is malformed.
class io_error : public error {
 public:
  using error::error;
};

}  // namespace bitnet
