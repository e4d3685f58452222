/* Bare-metal start-up for Cortex-M under QEMU (mps2-an385, mps2-an386, mps2-an500):
 * the vector table at address 0, the FPU turned on where the build uses it, .bss cleared, then
 * main, its return value the exit status (newlib's rdimon: semihosting). */
#include <stdint.h>
#include <stdlib.h>

extern int main(void);
extern void initialise_monitor_handles(void);
extern uint32_t __bss_start__[], __bss_end__[], __stack[];
void reset(void);

static void fault(void)
{
    exit(3);
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))__stack, reset, fault, fault, fault, fault, fault, 0, 0, 0, 0, fault, fault, 0, fault, fault,
};

void reset(void)
{
#if defined(__ARM_FP)
    /* CPACR: full access to CP10 and CP11, the FPU */
    *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb");
#endif
    for (uint32_t *p = __bss_start__; p < __bss_end__; ++p) {
        *p = 0;
    }
    initialise_monitor_handles();
    exit(main());
}

/* newlib's exit runs the fini array through these; nothing to do */
void _init(void)
{
}

void _fini(void)
{
}
