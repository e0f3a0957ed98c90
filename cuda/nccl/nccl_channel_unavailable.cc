// NcclChannel in a build without NCCL: every call says so.
#include "cuda/nccl/nccl_channel.h"

namespace kvgate::ops {

absl::StatusOr<std::string> NcclChannel::NewUniqueId() {
  return absl::UnimplementedError("nccl channel: this build has no NCCL (KVGATE_WITH_NCCL=OFF)");
}

absl::StatusOr<std::unique_ptr<NcclChannel>> NcclChannel::Connect(std::string_view, int32_t, int32_t, int32_t,
                                                                  absl::Time) {
  return absl::UnimplementedError("nccl channel: this build has no NCCL (KVGATE_WITH_NCCL=OFF)");
}

}  // namespace kvgate::ops
