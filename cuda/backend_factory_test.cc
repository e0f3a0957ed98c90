#include <gtest/gtest.h>

#include "cuda/backend.h"
#include "cuda/cuda_backend.h"

namespace kvgate::ops {
namespace {

TEST(BackendFactoryTest, CpuAlwaysExists) {
  auto backend = CreateBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->Name(), "cpu");
}

TEST(BackendFactoryTest, UnknownNamesAreInvalidArgument) {
  EXPECT_EQ(CreateBackend("tpu").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateBackend("cuda:x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateBackend("cuda:-1").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BackendFactoryTest, CudaWithoutBuildOrDeviceSaysWhy) {
  auto backend = CreateBackend("cuda");
  if (KVGATE_WITH_CUDA == 0) {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnimplemented);
  } else if (CudaDeviceCount() == 0) {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable);
  } else {
    EXPECT_TRUE(backend.ok()) << backend.status();
  }
  EXPECT_EQ(CreateBackend("cuda:4096").status().code(),
            KVGATE_WITH_CUDA ? absl::StatusCode::kUnavailable : absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace kvgate::ops
