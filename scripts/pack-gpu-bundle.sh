#!/usr/bin/env bash
# Packs the GPU-relevant binaries of a CUDA build, plus the non-system shared libraries
# they need (gRPC, protobuf, abseil, OpenBLAS, ...), into one folder that can be copied
# to a GPU machine without those packages. The CUDA runtime libraries are left out:
# the GPU machine's own CUDA toolkit provides them.
#   scripts/pack-gpu-bundle.sh BUILD_DIR BUNDLE_DIR
set -euo pipefail
build=${1:?build dir}
bundle=${2:?bundle dir}
rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib"
binaries=(cli/kvgate cuda/cuda_backend_test tests/golden_model_test)
for b in "${binaries[@]}"; do
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
du -sh "$bundle"
