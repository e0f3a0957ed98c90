# The retrieval tasks of bench/retrieval_tasks.md (included from bench/CMakeLists.txt).
# `kvgate eval` (cli/eval_command.cc, a source of kvgate_cli) builds its prompts with it.
add_library(kvgate_retrieval_tasks STATIC ${CMAKE_CURRENT_LIST_DIR}/retrieval_tasks.cc)
add_library(kvgate::retrieval_tasks ALIAS kvgate_retrieval_tasks)
target_include_directories(kvgate_retrieval_tasks PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(kvgate_retrieval_tasks PUBLIC kvgate_engine absl::strings)
target_link_libraries(kvgate_cli PUBLIC kvgate_retrieval_tasks)

kvgate_add_test(retrieval_tasks_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/retrieval_tasks_test.cc
                LIBS kvgate_retrieval_tasks LABELS unit)
