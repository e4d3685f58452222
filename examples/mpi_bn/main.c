/*
 * Data-parallel batch norm over MPI with normgen's generated C: every process holds a shard of
 * the batch (of uneven size, one of them empty), and the statistics of the forward and the two
 * sums of the backward are those of the whole batch.
 *
 *   forward:  stem_bn_sync_stats -> MPI_Allgather of the stem_bn_stats (count, mean, M2 per
 *             channel; 1 + 2C doubles) -> stem_bn_stats_merge in rank order (Chan's formula)
 *             -> stem_bn_sync_finish (running statistics) -> stem_bn_sync_normalize
 *   backward: stem_bn_sync_backward_sums -> MPI_Allreduce (sum; 2C doubles) -> stem_bn_sync_backward
 *
 *   make && mpirun -np 3 ./mpi_bn     (see the Makefile; as root add --allow-run-as-root)
 *
 * Every process also runs the layer's single-process train_forward and backward on the whole
 * batch and prints how far its shard's results are from them; the running statistics and
 * gradients must be bit-identical on every process.
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <string.h>

#include "stem_bn.h"

#define E STEM_BN_ELEMENTS_PER_BATCH
#define C STEM_BN_CHANNELS
#define MAX_BATCH 24
#define MAX_PROCS 64

/* NAME_stats is the all-gather's payload as it is: doubles, no padding. */
typedef char stats_are_doubles[sizeof(stem_bn_stats) == sizeof(double) * STEM_BN_SYNC_STATS_DOUBLES ? 1 : -1];

static float x_all[MAX_BATCH * E], dy_all[MAX_BATCH * E], y_all[MAX_BATCH * E], dx_all[MAX_BATCH * E];
static float y[MAX_BATCH * E], dx[MAX_BATCH * E];
static stem_bn_stats gathered[MAX_PROCS];

/* Samples of rank r: uneven, every third rank from the second one empty. */
static int shard_size(int r) { return r % 3 == 1 ? 0 : r + 1; }

static double input_value(long i) { return 3.0 + 2.0 * sin(0.37 * (double)i) + 0.25 * cos(0.011 * (double)i); }
static double grad_value(long i) { return cos(0.13 * (double)i) - 0.2; }

/* max |a - b| / (1 + max |b|) */
static double scaled_error(const float *a, const float *b, long n)
{
    double err = 0, big = 0;
    for (long i = 0; i < n; ++i) {
        const double d = fabs((double)a[i] - (double)b[i]);
        err = d > err ? d : err;
        big = fabs((double)b[i]) > big ? fabs((double)b[i]) : big;
    }
    return err / (1 + big);
}

int main(int argc, char **argv)
{
    int rank, procs;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &procs);
    int total = 0, first = 0;
    for (int r = 0; r < procs; ++r) {
        total += shard_size(r);
        first += r < rank ? shard_size(r) : 0;
    }
    if (procs > MAX_PROCS || total > MAX_BATCH) {
        if (rank == 0) {
            fprintf(stderr, "at most %d processes and %d samples\n", MAX_PROCS, MAX_BATCH);
        }
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    const int batch = shard_size(rank);
    for (long i = 0; i < (long)total * E; ++i) {
        x_all[i] = (float)input_value(i);
        dy_all[i] = (float)grad_value(i);
    }
    const float *x = x_all + (long)first * E;
    const float *dy = dy_all + (long)first * E;
    int rc = 0;

    /* forward: the shard's statistics, gathered and merged in rank order */
    stem_bn_stats local, merged;
    rc |= stem_bn_sync_stats(x, &local, batch);
    MPI_Allgather(&local, STEM_BN_SYNC_STATS_DOUBLES, MPI_DOUBLE, gathered, STEM_BN_SYNC_STATS_DOUBLES, MPI_DOUBLE,
                  MPI_COMM_WORLD);
    memset(&merged, 0, sizeof merged);
    for (int r = 0; r < procs; ++r) {
        rc |= stem_bn_stats_merge(&merged, &gathered[r]);
    }
    float running_mean[C], running_var[C];
    double mean[C], invstd[C];
    for (int c = 0; c < C; ++c) {
        running_mean[c] = 0.0f;
        running_var[c] = 1.0f;
    }
    rc |= stem_bn_sync_finish(&merged, running_mean, running_var, mean, invstd);
    rc |= stem_bn_sync_normalize(x, mean, invstd, y, batch);

    /* backward: the shard's sums, all-reduced */
    double sums[STEM_BN_SYNC_SUMS_DOUBLES];
    float dscale[C], doffset[C];
    rc |= stem_bn_sync_backward_sums(x, dy, mean, sums, batch);
    MPI_Allreduce(MPI_IN_PLACE, sums, STEM_BN_SYNC_SUMS_DOUBLES, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    rc |= stem_bn_sync_backward(x, dy, mean, invstd, sums, merged.count, dx, dscale, doffset, batch);

    /* one process with the whole batch */
    float rm1[C], rv1[C], ds1[C], do1[C];
    for (int c = 0; c < C; ++c) {
        rm1[c] = 0.0f;
        rv1[c] = 1.0f;
    }
    rc |= stem_bn_train_forward(x_all, y_all, total, rm1, rv1);
    rc |= stem_bn_backward(x_all, dy_all, dx_all, ds1, do1, total);

    /* every process has rank 0's running statistics and gradients, bit for bit */
    float mine[4 * C], root[4 * C];
    memcpy(mine, running_mean, sizeof running_mean);
    memcpy(mine + C, running_var, sizeof running_var);
    memcpy(mine + 2 * C, dscale, sizeof dscale);
    memcpy(mine + 3 * C, doffset, sizeof doffset);
    memcpy(root, mine, sizeof mine);
    MPI_Bcast(root, 4 * C, MPI_FLOAT, 0, MPI_COMM_WORLD);
    const int identical = memcmp(root, mine, sizeof mine) == 0;

    double err[6] = {
        scaled_error(y, y_all + (long)first * E, (long)batch * E),
        scaled_error(dx, dx_all + (long)first * E, (long)batch * E),
        scaled_error(running_mean, rm1, C),
        scaled_error(running_var, rv1, C),
        scaled_error(dscale, ds1, C),
        scaled_error(doffset, do1, C),
    };
    printf("rank %d batch %d rc=%d identical=%d y=%.3e dx=%.3e running_mean=%.3e running_var=%.3e dscale=%.3e doffset=%.3e\n",
           rank, batch, rc, identical, err[0], err[1], err[2], err[3], err[4], err[5]);
    fflush(stdout);
    double worst[6];
    int bad = rc != 0 || !identical, any_bad = 0;
    MPI_Reduce(err, worst, 6, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    MPI_Reduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        double w = 0;
        for (int i = 0; i < 6; ++i) {
            w = worst[i] > w ? worst[i] : w;
        }
        printf("%s: %d processes, global batch %d, largest scaled error %.3e\n", any_bad ? "FAILED" : "OK", procs,
               total, w);
    }
    MPI_Finalize();
    return any_bad;
}
