# The README's install recipe, run as written: its "cmake -S . -B build ..." and "cmake --install
# build --prefix /opt/bitnet" lines (read from README.md, so the test follows the README) in a copy
# of the source tree, with the prefix moved to WORK/prefix; then the find_package consumer is built
# against that prefix. A header-only install has no build step: it must work without one.
# -DSOURCE=<bitnet source tree> -DWORK=<scratch folder> -DCONSUMER=<tests/consumer/find_package>
# -DGENERATOR=<generator> -DCXX=<compiler>
cmake_minimum_required(VERSION 3.23)
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}/src")
file(GLOB top LIST_DIRECTORIES true "${SOURCE}/*")
foreach(entry IN LISTS top)
  get_filename_component(name "${entry}" NAME)
  if(NOT name STREQUAL "build" AND NOT name MATCHES "^\\.")
    file(COPY "${entry}" DESTINATION "${WORK}/src")
  endif()
endforeach()

file(STRINGS "${SOURCE}/README.md" readme)
set(commands "")
foreach(line IN LISTS readme)
  if(line MATCHES "^cmake -S \\. -B build" OR line MATCHES "^cmake --install build")
    list(APPEND commands "${line}")
  endif()
endforeach()
list(LENGTH commands count)
if(NOT count EQUAL 2)
  message(FATAL_ERROR "README.md: expected the two install lines (cmake -S . -B build ..., cmake --install build ...), found: ${commands}")
endif()
foreach(line IN LISTS commands)
  string(REPLACE "/opt/bitnet" "${WORK}/prefix" line "${line}")
  separate_arguments(argv UNIX_COMMAND "${line}")
  list(POP_FRONT argv)  # "cmake"
  message(STATUS "README: ${line}")
  execute_process(COMMAND "${CMAKE_COMMAND}" ${argv} WORKING_DIRECTORY "${WORK}/src"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "README command failed (${rc}): ${line}\n${out}\n${err}")
  endif()
endforeach()
foreach(f include/bitnet/replace.hpp include/bitnet/convert.hpp share/cmake/bitnet/bitnetConfig.cmake)
  if(NOT EXISTS "${WORK}/prefix/${f}")
    message(FATAL_ERROR "the README install did not produce ${f}")
  endif()
endforeach()
if(EXISTS "${WORK}/prefix/bin/bitnet-convert")
  message(FATAL_ERROR "bin/bitnet-convert was installed although nothing was built")
endif()

# A user's project finds it (no converter: the tools component is absent, not an error).
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${CONSUMER}" -B "${WORK}/consumer" -G "${GENERATOR}"
                        "-DCMAKE_CXX_COMPILER=${CXX}" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${WORK}/prefix"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring the find_package consumer failed:\n${out}\n${err}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${WORK}/consumer" --target consumer RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building the find_package consumer failed:\n${out}\n${err}")
endif()
execute_process(COMMAND "${WORK}/consumer/consumer" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the find_package consumer failed:\n${out}\n${err}")
endif()
file(REMOVE_RECURSE "${WORK}")
