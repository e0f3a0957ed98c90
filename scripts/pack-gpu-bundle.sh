#!/usr/bin/env bash
# Packs the GPU-relevant binaries of a CUDA build, plus the non-system shared libraries
# they need (gRPC, protobuf, abseil, OpenBLAS, ...), into one folder that can be copied
# to a GPU machine without those packages. The CUDA runtime libraries are left out:
# the GPU machine's own CUDA toolkit provides them. Binaries the build did not make are
# skipped with a note. A BUNDLE ending in .tar.xz is written as that compressed archive
# (of a folder named like it, without the suffix): the device tool carries at most
# 64 MiB. The bundle records the source commit in COMMIT.
#   scripts/pack-gpu-bundle.sh BUILD_DIR BUNDLE_DIR|BUNDLE.tar.xz
set -euo pipefail
build=${1:?build dir}
target=${2:?bundle dir or .tar.xz}
bundle=${target%.tar.xz}
rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib"
binaries=(cli/kvgate cuda/cuda_backend_test cuda/cuda_bf16_ops_test tests/golden_model_test
          bench/gpu_engine_bench kv/kv_handoff_test kv/decode_batch_test
          kv/tcp_transport_test kv/decode_step_tables_test kv/kv_pool_test kv/cuda_ipc_transport_test
          tests/integration/integration_test bench/kv_transfer_bench cuda/nccl_channel_test
          kv/nccl_self_transfer_test gates/backend_selection_test)
for b in "${binaries[@]}"; do
  if [[ ! -f "$build/$b" ]]; then
    echo "pack-gpu-bundle: $build/$b not built, skipped" >&2
    continue
  fi
  cp "$build/$b" "$bundle/bin/"
  strip --strip-debug "$bundle/bin/$(basename "$b")"
done
for b in "$bundle"/bin/*; do
  ldd "$b" | awk '/=> \// {print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libcuda.so*|libcudart*|libcublas*|libnccl*) ;;
    *) cp -L "$lib" "$bundle/lib/" ;;
  esac
done
src=$(cd "$(dirname "$0")/.." && pwd)
(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown) > "$bundle/COMMIT"
if [[ -n "$(git -C "$src" status --porcelain -- cuda engine bench 2>/dev/null)" ]]; then
  sed -i 's/$/+uncommitted/' "$bundle/COMMIT"
fi
if [[ "$target" == *.tar.xz ]]; then
  tar -C "$(dirname "$bundle")" -cJf "$target" "$(basename "$bundle")"
  rm -rf "$bundle"
  du -sh "$target"
else
  du -sh "$bundle"
fi
