/*
 * A plain C program using normgen's generated layers: no runtime, no heap, just the generated
 * NAME.h / NAME.c files of examples/cnn_block (checked into generated/c/cnn_block).
 *
 *   make            (see the Makefile: gcc main.c plus the generated .c files, -lm)
 *
 * Prints, per layer call, the mean and standard deviation of the output and its first values.
 */
#include <math.h>
#include <stdio.h>

#include "block_gn.h"
#include "head_bn.h"
#include "stem_bn.h"

#define BATCH 2

static float stem_x[BATCH * STEM_BN_ELEMENTS_PER_BATCH];
static float stem_y[BATCH * STEM_BN_ELEMENTS_PER_BATCH];
static float gn_x[BATCH * BLOCK_GN_ELEMENTS_PER_BATCH];
static double head_x[BATCH * HEAD_BN_ELEMENTS_PER_BATCH];

/* The same deterministic input the tests rebuild in NumPy. */
static double input_value(long i) { return 2.0 * sin(0.37 * (double)i) + 0.25 * cos(0.011 * (double)i); }

static void report(const char *what, int rc, const double *sum_sq, long n, double first0, double first1)
{
    const double mean = sum_sq[0] / (double)n;
    const double sd = sqrt(sum_sq[1] / (double)n - mean * mean);
    printf("%s rc=%d mean=%.6f std=%.6f y0=%.6f y1=%.6f\n", what, rc, mean, sd, first0, first1);
}

static void stats_f(const float *y, long n, double *out)
{
    out[0] = out[1] = 0.0;
    for (long i = 0; i < n; ++i) {
        out[0] += y[i];
        out[1] += (double)y[i] * y[i];
    }
}

int main(void)
{
    double s[2];
    long n;

    n = BATCH * STEM_BN_ELEMENTS_PER_BATCH;
    for (long i = 0; i < n; ++i) stem_x[i] = (float)input_value(i);
    int rc = stem_bn_predict(stem_x, stem_y, BATCH);
    stats_f(stem_y, n, s);
    report("stem_bn_predict", rc, s, n, stem_y[0], stem_y[1]);

    float running_mean[STEM_BN_CHANNELS], running_var[STEM_BN_CHANNELS];
    for (int c = 0; c < STEM_BN_CHANNELS; ++c) {
        running_mean[c] = 0.0f;
        running_var[c] = 1.0f;
    }
    rc = stem_bn_train_forward(stem_x, stem_y, BATCH, running_mean, running_var);
    stats_f(stem_y, n, s);
    report("stem_bn_train_forward", rc, s, n, stem_y[0], stem_y[1]);
    printf("running_mean[0]=%.6f running_var[0]=%.6f\n", running_mean[0], running_var[0]);

    n = BATCH * BLOCK_GN_ELEMENTS_PER_BATCH;
    for (long i = 0; i < n; ++i) gn_x[i] = (float)input_value(i);
    rc = block_gn_predict(gn_x, gn_x, BATCH); /* in place */
    stats_f(gn_x, n, s);
    report("block_gn_predict", rc, s, n, gn_x[0], gn_x[1]);

    n = BATCH * HEAD_BN_ELEMENTS_PER_BATCH;
    for (long i = 0; i < n; ++i) head_x[i] = input_value(i);
    rc = head_bn_predict(head_x, head_x, BATCH);
    s[0] = s[1] = 0.0;
    for (long i = 0; i < n; ++i) {
        s[0] += head_x[i];
        s[1] += head_x[i] * head_x[i];
    }
    report("head_bn_predict", rc, s, n, head_x[0], head_x[1]);

    /* invalid arguments: documented codes, outputs untouched */
    printf("errors null=%d batch=%d\n", stem_bn_predict(NULL, stem_y, BATCH), stem_bn_predict(stem_x, stem_y, 0));
    return 0;
}
