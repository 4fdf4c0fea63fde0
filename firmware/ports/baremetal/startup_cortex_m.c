/* Minimal Cortex-M start-up for the smpq_edge self-check on a bare-metal image.
 *
 * Vector table (initial stack pointer, reset and the core exceptions), then Reset_Handler:
 * enable the FPU through CPACR when the build uses one (before any floating-point instruction
 * runs), copy .data from flash to RAM, zero .bss, and enter newlib's _start, which sets up
 * semihosting (--specs=rdimon.specs), runs constructors and calls main; main's return value
 * becomes the exit status (semihosting SYS_EXIT).
 *
 * Symbols from linker.ld: __StackTop, __data_load__, __data_start__, __data_end__,
 * __bss_start__, __bss_end__.
 */
#include <stdint.h>

#ifndef SMPQ_SEMIHOSTING
#define SMPQ_SEMIHOSTING 1
#endif

extern uint32_t __StackTop;
extern uint32_t __data_load__;
extern uint32_t __data_start__;
extern uint32_t __data_end__;
extern uint32_t __bss_start__;
extern uint32_t __bss_end__;

extern void _start(void) __attribute__((noreturn));

void Reset_Handler(void) __attribute__((noreturn));
void Default_Handler(void);
void NMI_Handler(void) __attribute__((weak, alias("Default_Handler")));
void HardFault_Handler(void) __attribute__((weak, alias("Default_Handler")));
void MemManage_Handler(void) __attribute__((weak, alias("Default_Handler")));
void BusFault_Handler(void) __attribute__((weak, alias("Default_Handler")));
void UsageFault_Handler(void) __attribute__((weak, alias("Default_Handler")));
void SVC_Handler(void) __attribute__((weak, alias("Default_Handler")));
void DebugMon_Handler(void) __attribute__((weak, alias("Default_Handler")));
void PendSV_Handler(void) __attribute__((weak, alias("Default_Handler")));
void SysTick_Handler(void) __attribute__((weak, alias("Default_Handler")));

typedef void (*smpq_vector_t)(void);

/* Coprocessor Access Control Register: CP10 and CP11 (the FPU) at bits 20..23. */
#define SMPQ_CPACR (*(volatile uint32_t*)(uintptr_t)0xE000ED88u)
#define SMPQ_CPACR_CP10_CP11_FULL (0xFu << 20)

__attribute__((section(".isr_vector"), used)) const smpq_vector_t g_smpq_vectors[16] = {
    (smpq_vector_t)(uintptr_t)&__StackTop,
    Reset_Handler,
    NMI_Handler,
    HardFault_Handler,
    MemManage_Handler,
    BusFault_Handler,
    UsageFault_Handler,
    0,
    0,
    0,
    0,
    SVC_Handler,
    DebugMon_Handler,
    0,
    PendSV_Handler,
    SysTick_Handler,
};

void Reset_Handler(void) {
#if defined(__ARM_FP)
  SMPQ_CPACR |= SMPQ_CPACR_CP10_CP11_FULL;
#if defined(__ARM_ARCH)
  __asm volatile("dsb\n\tisb" ::: "memory");
#endif
#endif
  {
    const uint32_t* from = &__data_load__;
    uint32_t* to = &__data_start__;
    while (to < &__data_end__) *to++ = *from++;
  }
  {
    uint32_t* to = &__bss_start__;
    while (to < &__bss_end__) *to++ = 0u;
  }
  _start();
}

/* Any unexpected exception: report it through semihosting and exit with a failure status, so a
 * run under QEMU or a debugger ends instead of hanging; without semihosting, stop here. */
void Default_Handler(void) {
#if SMPQ_SEMIHOSTING && defined(__ARM_ARCH)
  static const char message[] = "smpq_edge: unexpected exception (fault)\n";
  /* SYS_WRITE0 (0x04) prints a string; SYS_EXIT (0x18) with ADP_Stopped_RunTimeErrorUnknown. */
  register uint32_t op __asm__("r0") = 0x04u;
  register const void* arg __asm__("r1") = message;
  __asm volatile("bkpt 0xab" : "+r"(op) : "r"(arg) : "memory");
  op = 0x18u;
  arg = (const void*)(uintptr_t)0x20023u;
  __asm volatile("bkpt 0xab" : "+r"(op) : "r"(arg) : "memory");
#endif
  for (;;) {
  }
}
