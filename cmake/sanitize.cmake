# Sanitizer and fuzzing builds (issue 17). Included from the top-level CMakeLists.txt
# before any target, so every kvgate library, test and tool is instrumented alike.
#
#   -DKVGATE_SANITIZE=address,undefined   AddressSanitizer + UndefinedBehaviorSanitizer
#   -DKVGATE_SANITIZE=thread              ThreadSanitizer (scripts/tsan-service-tests.sh)
#   -DKVGATE_FUZZ=ON (clang only)         libFuzzer targets in fuzz/ (fuzz/README.md)
#
# System libraries (abseil, gRPC, protobuf, OpenBLAS) are not rebuilt: ASan/UBSan only
# see our code, and TSan needs its suppression file for what it cannot see
# (tsan.supp, each entry says why).
set(KVGATE_SANITIZE "" CACHE STRING
    "Comma-separated -fsanitize= list: address,undefined or thread; empty = none")
option(KVGATE_FUZZ "Build the libFuzzer targets in fuzz/ (clang only)" OFF)

if(KVGATE_SANITIZE)
  if(KVGATE_SANITIZE MATCHES "thread" AND KVGATE_SANITIZE MATCHES "address")
    message(FATAL_ERROR "KVGATE_SANITIZE: thread and address cannot be combined")
  endif()
  if(KVGATE_WITH_CUDA)
    message(FATAL_ERROR "KVGATE_SANITIZE needs -DKVGATE_WITH_CUDA=OFF (nvcc objects are not instrumented)")
  endif()
  set(kvgate_san_flags -fsanitize=${KVGATE_SANITIZE} -fno-omit-frame-pointer -g)
  if(KVGATE_SANITIZE MATCHES "undefined")
    # A UBSan report fails the test that triggered it instead of scrolling by.
    list(APPEND kvgate_san_flags -fno-sanitize-recover=undefined)
  endif()
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${kvgate_san_flags}>")
  add_link_options(-fsanitize=${KVGATE_SANITIZE})
  message(STATUS "kvgate: sanitizers ${KVGATE_SANITIZE}")
endif()

if(KVGATE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "KVGATE_FUZZ needs clang: -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++")
  endif()
  # Coverage feedback in every library the targets link; -fsanitize=fuzzer (main) only on
  # the fuzz executables themselves (fuzz/CMakeLists.txt).
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=fuzzer-no-link>")
endif()
