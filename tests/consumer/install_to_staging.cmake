# Installs the build tree BINARY_DIR into a fresh PREFIX (a stale staging tree would hide a missing file).
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BINARY_DIR}" --prefix "${PREFIX}"
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install failed: ${result}")
endif()
if(NOT EXISTS "${PREFIX}/share/cmake/bitnet/bitnetConfig.cmake")
  message(FATAL_ERROR "the install did not produce share/cmake/bitnet/bitnetConfig.cmake")
endif()
if(EXPECT_CONVERTER AND NOT EXISTS "${PREFIX}/bin/bitnet-convert")
  message(FATAL_ERROR "the install did not produce bin/bitnet-convert")
endif()
