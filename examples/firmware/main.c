/* normgen firmware example: one layer norm's predict, bare metal, its output printed through
 * semihosting as the bits of each float (printf of a float would promote it to double). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fw_norm.h"

#define BATCH 2
#define COUNT (BATCH * FW_NORM_ELEMENTS_PER_BATCH)

static float x[COUNT];
static float y[COUNT];

int main(void)
{
    for (int i = 0; i < COUNT; ++i) {
        x[i] = (float)((i * 37) % 101) / 8.0f - 6.0f; /* a deterministic input */
    }
    const int rc = fw_norm_predict(x, y, BATCH);
    printf("fw_norm_predict %d\n", rc);
    for (int i = 0; i < COUNT; ++i) {
        uint32_t bits;
        memcpy(&bits, &y[i], sizeof bits);
        printf("%08lx\n", (unsigned long)bits);
    }
    return rc;
}
