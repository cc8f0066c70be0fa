# Cross build for AArch64 Linux with Debian's g++-aarch64-linux-gnu; ctest runs the test programs
# under qemu-user (qemu-aarch64, package qemu-user) with the target's libraries from
# /usr/aarch64-linux-gnu. The emulated CPU is chosen per test with QEMU_CPU (see tests/CMakeLists.txt).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
# Programs (qemu, cmake helpers) from the host; libraries from the target root; the header-only
# packages (Eigen, doctest, nlohmann-json) are architecture independent, found in the host's /usr.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
find_program(BITNET_QEMU_AARCH64 qemu-aarch64 REQUIRED)
set(CMAKE_CROSSCOMPILING_EMULATOR "${BITNET_QEMU_AARCH64};-L;/usr/aarch64-linux-gnu")
