// bitnet/bitnet.hpp - umbrella header: everything the library offers.
#pragma once

#include "bit_linear.hpp"
#include "errors.hpp"
#include "kernels.hpp"
#include "linear.hpp"
#include "matrix.hpp"
#include "pack.hpp"
#include "quant.hpp"
