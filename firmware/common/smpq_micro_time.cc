// TFLM's platform clock (tensorflow/lite/micro/micro_time.h) backed by smpq_timer, so that the
// interpreter's per-op profile events are in core clock cycles. Replaces TFLM's default
// micro_time.cc, which returns 0 on targets without <ctime>.
#include "tensorflow/lite/micro/micro_time.h"

#include "smpq_timer.h"

#ifndef SMPQ_CLOCK_HZ
#error "SMPQ_CLOCK_HZ (the core clock in Hz) must be defined by the build"
#endif

namespace tflite {

uint32_t ticks_per_second() { return static_cast<uint32_t>(SMPQ_CLOCK_HZ); }

uint32_t GetCurrentTimeTicks() { return smpq_timer_now(); }

}  // namespace tflite
