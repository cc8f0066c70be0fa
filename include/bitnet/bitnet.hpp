// bitnet/bitnet.hpp - umbrella header: everything the library offers.
#pragma once

#include "bit_linear.hpp"
#include "errors.hpp"
#include "hf.hpp"
#include "kernels.hpp"
#include "layer_traits.hpp"
#include "linear.hpp"
#include "matrix.hpp"
#include "pack.hpp"
#include "quant.hpp"
#include "replace.hpp"
#include "replace_options.hpp"
#include "replace_report.hpp"
#include "training.hpp"
#include "transfer.hpp"
#include "verify.hpp"
// bitnet/safetensors.hpp, bitnet/hf_safetensors.hpp and bitnet/state_dict.hpp need
// nlohmann/json: include them yourself and link bitnet::safetensors.
