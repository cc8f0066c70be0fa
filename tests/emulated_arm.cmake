# The emulated AArch64 stage (preset "arm", cmake/toolchains/aarch64-linux-gnu.cmake): the kernel, rotation (FWHT),
# packing, quantization and BitLinear tests cross-built and run under qemu-user, once per emulated
# CPU so that every ARM kernel path runs:
#   max         NEON + SDOT + SMMLA: neon, dotprod and i8mm kernels (and scalar) compared;
#   cortex-a76  NEON + SDOT, no i8mm: best_isa() falls back to dotprod;
#   cortex-a72  NEON only (Raspberry Pi 4 class): best_isa() is neon.
# BITNET_TEST_EXPECT_ISAS makes the run fail if a kernel the CPU has is not compiled or detected.
# The rest of the suite (graph walking, safetensors, ...) has no ISA-specific code and runs natively.
add_executable(bitnet_arm_tests main.cpp test_kernels.cpp test_group_kernels.cpp test_base3_kernels.cpp test_rotation.cpp
  test_pack.cpp test_quant.cpp test_bit_linear.cpp)
target_link_libraries(bitnet_arm_tests PRIVATE bitnet::bitnet bitnet_warnings doctest::doctest)
add_executable(bitnet_arm_forward_alloc_tests test_forward_alloc.cpp alloc_fault.cpp)
target_link_libraries(bitnet_arm_forward_alloc_tests PRIVATE bitnet::bitnet bitnet_warnings doctest::doctest)

function(bitnet_arm_test name cpu isas)
  add_test(NAME arm.${name} COMMAND bitnet_arm_tests ${ARGN})
  set_tests_properties(arm.${name} PROPERTIES ENVIRONMENT "QEMU_CPU=${cpu};BITNET_TEST_EXPECT_ISAS=${isas}")
endfunction()
bitnet_arm_test(max max "scalar,neon,dotprod,i8mm")
bitnet_arm_test(cortex_a76 cortex-a76 "scalar,neon,dotprod" "--test-case=kernels: *,group kernels: *,base3*,BitLinear: forward*")
bitnet_arm_test(cortex_a72 cortex-a72 "scalar,neon" "--test-case=kernels: *,group kernels: *,base3*,BitLinear: forward*")
# BITNET_ISA forces each kernel for the whole BitLinear suite; an invalid name, or an ISA the CPU
# lacks, is an error.
foreach(forced neon dotprod i8mm)
  add_test(NAME arm.forced_${forced} COMMAND bitnet_arm_tests "--test-case=BitLinear: *,kernels: ISA choice*")
  set_tests_properties(arm.forced_${forced} PROPERTIES ENVIRONMENT "QEMU_CPU=max;BITNET_ISA=${forced}")
endforeach()
add_test(NAME arm.invalid_isa COMMAND bitnet_arm_tests "--test-case=kernels: environment overrides*")
set_tests_properties(arm.invalid_isa PROPERTIES ENVIRONMENT "QEMU_CPU=cortex-a72;BITNET_ISA=avx9")
add_test(NAME arm.unsupported_isa COMMAND bitnet_arm_tests "--test-case=kernels: environment overrides*")
set_tests_properties(arm.unsupported_isa PROPERTIES ENVIRONMENT "QEMU_CPU=cortex-a76;BITNET_ISA=i8mm")
add_test(NAME arm.forward_alloc COMMAND bitnet_arm_forward_alloc_tests)
set_tests_properties(arm.forward_alloc PROPERTIES ENVIRONMENT "QEMU_CPU=max")

# Clang 14 compiles the ARM kernels only where the translation unit enables SDOT / SMMLA (see
# docs/kernels.md): the kernel tests must compile warning-free both ways (compile only: the stage's
# time budget allows one cross compiler's binaries under qemu).
find_program(BITNET_CLANG14 clang++-14)
if(BITNET_CLANG14)
  set(clang_arm_command "${BITNET_CLANG14}" --target=aarch64-linux-gnu -std=c++20 -fsyntax-only
    -Wall -Wextra -Wpedantic -Werror "-I${PROJECT_SOURCE_DIR}/include"
    "-I$<JOIN:$<TARGET_PROPERTY:Eigen3::Eigen,INTERFACE_INCLUDE_DIRECTORIES>,$<SEMICOLON>-I>"
    "${CMAKE_CURRENT_SOURCE_DIR}/test_kernels.cpp")
  add_test(NAME arm.clang14_armv8 COMMAND ${clang_arm_command} COMMAND_EXPAND_LISTS)
  add_test(NAME arm.clang14_dotprod_i8mm COMMAND ${clang_arm_command} -march=armv8.2-a+dotprod+i8mm COMMAND_EXPAND_LISTS)
endif()
