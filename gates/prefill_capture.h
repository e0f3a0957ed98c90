// File: the prefill records the policies score (defined by the engine, which fills them;
// gates depend on the engine, not the other way round).
#pragma once

#include "engine/prefill_capture.h"

namespace kvgate::gates {

using engine::CaptureRequest;
using engine::ModelShape;
using engine::PrefillCapture;

}  // namespace kvgate::gates
