/* Cycle counter for the smpq_edge self-check.
 *
 * DWT->CYCCNT on cores that have one (Cortex-M3/M4/M7/M33/M55) when it is seen to count;
 * otherwise SysTick, clocked by the core and widened to 32 bits in its interrupt (Cortex-M0+,
 * and QEMU, whose DWT reads 0). Both count core clock cycles. Plain C, no CMSIS headers: the
 * few registers used are architectural (ARMv6-M / ARMv7-M / ARMv8-M system control space).
 *
 * Build switches: SMPQ_HAS_DWT (0/1), SMPQ_USE_SYSTICK (0/1), SMPQ_DWT_UNLOCK (Cortex-M7 parts
 * whose DWT needs the CoreSight lock opened), SMPQ_SYSTICK_HANDLER (the vector's name in the
 * startup code in use; SysTick_Handler by default).
 */
#ifndef SMPQ_TIMER_H_
#define SMPQ_TIMER_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  SMPQ_TIMER_NONE = 0,
  SMPQ_TIMER_DWT = 1,
  SMPQ_TIMER_SYSTICK = 2
} smpq_timer_source_t;

/* Start the counter; returns the source in use. Safe to call more than once. */
smpq_timer_source_t smpq_timer_init(void);

/* The source chosen by smpq_timer_init (SMPQ_TIMER_NONE before it). */
smpq_timer_source_t smpq_timer_source(void);

/* "DWT CYCCNT", "SysTick" or "none". */
const char* smpq_timer_source_name(void);

/* Core clock cycles since an arbitrary origin; differences are valid modulo 2^32. */
uint32_t smpq_timer_now(void);

#ifdef __cplusplus
}
#endif

#endif /* SMPQ_TIMER_H_ */
