/* Cycle counter for the smpq_edge self-check; see smpq_timer.h. */
#include "smpq_timer.h"

#ifndef SMPQ_HAS_DWT
#define SMPQ_HAS_DWT 0
#endif
#ifndef SMPQ_USE_SYSTICK
#define SMPQ_USE_SYSTICK 1
#endif
#ifndef SMPQ_DWT_UNLOCK
#define SMPQ_DWT_UNLOCK 0
#endif
#ifndef SMPQ_SYSTICK_HANDLER
#define SMPQ_SYSTICK_HANDLER SysTick_Handler
#endif

#define SMPQ_REG32(address) (*(volatile uint32_t*)(uintptr_t)(address))

/* Debug Exception and Monitor Control Register: TRCENA powers the DWT. */
#define SMPQ_DEMCR SMPQ_REG32(0xE000EDFCu)
#define SMPQ_DEMCR_TRCENA (1u << 24)
/* Data Watchpoint and Trace unit. */
#define SMPQ_DWT_CTRL SMPQ_REG32(0xE0001000u)
#define SMPQ_DWT_CYCCNT SMPQ_REG32(0xE0001004u)
#define SMPQ_DWT_LAR SMPQ_REG32(0xE0001FB0u)
#define SMPQ_DWT_CTRL_CYCCNTENA (1u << 0)
#define SMPQ_DWT_CTRL_NOCYCCNT (1u << 25)
#define SMPQ_CORESIGHT_UNLOCK 0xC5ACCE55u
/* SysTick: control/status, reload and current value. */
#define SMPQ_SYST_CSR SMPQ_REG32(0xE000E010u)
#define SMPQ_SYST_RVR SMPQ_REG32(0xE000E014u)
#define SMPQ_SYST_CVR SMPQ_REG32(0xE000E018u)
#define SMPQ_SYST_CSR_ENABLE (1u << 0)
#define SMPQ_SYST_CSR_TICKINT (1u << 1)
#define SMPQ_SYST_CSR_CLKSOURCE_CORE (1u << 2)
#define SMPQ_SYSTICK_PERIOD 0x01000000u /* 24-bit counter */
/* Interrupt Control and State Register: SysTick exception pending. */
#define SMPQ_ICSR SMPQ_REG32(0xE000ED04u)
#define SMPQ_ICSR_PENDSTSET (1u << 26)

static smpq_timer_source_t s_source = SMPQ_TIMER_NONE;

#if SMPQ_USE_SYSTICK
static volatile uint32_t s_systick_wraps = 0;

void SMPQ_SYSTICK_HANDLER(void);
void SMPQ_SYSTICK_HANDLER(void) { s_systick_wraps++; }

static uint32_t systick_now(void) {
  uint32_t wraps;
  uint32_t value;
  uint32_t pending;
  do { /* re-read if the interrupt counted a wrap in between */
    wraps = s_systick_wraps;
    value = SMPQ_SYST_CVR;
    pending = SMPQ_ICSR & SMPQ_ICSR_PENDSTSET;
  } while (wraps != s_systick_wraps);
  if (pending && value > SMPQ_SYSTICK_PERIOD / 2u) {
    wraps++; /* reloaded, but the interrupt has not run yet */
  }
  return wraps * SMPQ_SYSTICK_PERIOD + (SMPQ_SYSTICK_PERIOD - 1u - value);
}
#endif

#if SMPQ_HAS_DWT
static int dwt_start(void) {
  volatile uint32_t spin;
  uint32_t before;
  SMPQ_DEMCR |= SMPQ_DEMCR_TRCENA;
#if SMPQ_DWT_UNLOCK
  SMPQ_DWT_LAR = SMPQ_CORESIGHT_UNLOCK;
#endif
  if (SMPQ_DWT_CTRL & SMPQ_DWT_CTRL_NOCYCCNT) {
    return 0;
  }
  SMPQ_DWT_CYCCNT = 0;
  SMPQ_DWT_CTRL |= SMPQ_DWT_CTRL_CYCCNTENA;
  before = SMPQ_DWT_CYCCNT;
  for (spin = 0; spin < 64u; spin++) {
  }
  return SMPQ_DWT_CYCCNT != before; /* an emulator may accept the writes yet never count */
}
#endif

smpq_timer_source_t smpq_timer_init(void) {
  if (s_source != SMPQ_TIMER_NONE) {
    return s_source;
  }
#if SMPQ_HAS_DWT
  if (dwt_start()) {
    s_source = SMPQ_TIMER_DWT;
    return s_source;
  }
#endif
#if SMPQ_USE_SYSTICK
  SMPQ_SYST_CSR = 0u;
  SMPQ_SYST_RVR = SMPQ_SYSTICK_PERIOD - 1u;
  SMPQ_SYST_CVR = 0u;
  SMPQ_SYST_CSR = SMPQ_SYST_CSR_ENABLE | SMPQ_SYST_CSR_TICKINT | SMPQ_SYST_CSR_CLKSOURCE_CORE;
  {
    /* The counter holds 0 until its first clock loads the reload value (without an interrupt):
     * wait for that, or the first reading would look like a wrap about to happen. */
    uint32_t spin;
    for (spin = 0; spin < 1000000u && SMPQ_SYST_CVR == 0u; spin++) {
    }
  }
  s_source = SMPQ_TIMER_SYSTICK;
#endif
  return s_source;
}

smpq_timer_source_t smpq_timer_source(void) { return s_source; }

const char* smpq_timer_source_name(void) {
  switch (s_source) {
    case SMPQ_TIMER_DWT:
      return "DWT CYCCNT";
    case SMPQ_TIMER_SYSTICK:
      return "SysTick";
    default:
      return "none";
  }
}

uint32_t smpq_timer_now(void) {
  switch (s_source) {
#if SMPQ_HAS_DWT
    case SMPQ_TIMER_DWT:
      return SMPQ_DWT_CYCCNT;
#endif
#if SMPQ_USE_SYSTICK
    case SMPQ_TIMER_SYSTICK:
      return systick_now();
#endif
    default:
      return 0u;
  }
}
