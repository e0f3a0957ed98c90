# kvgate_kv_planner: joins a gates/ policy to the KV pool for the engine's generator.
add_library(kvgate_kv_planner STATIC ${CMAKE_CURRENT_LIST_DIR}/policy_planner.cc)
target_include_directories(kvgate_kv_planner PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(kvgate_kv_planner PUBLIC kvgate_kv kvgate_gates kvgate_engine)

kvgate_add_test(policy_planner_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/policy_planner_test.cc
                LIBS kvgate_kv_planner LABELS unit)
