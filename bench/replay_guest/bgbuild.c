/* bgbuild: a stand-in for a build, for bench/replay.py.
 *
 *   bgbuild MIB UNITS [GROW_PERCENT]
 *
 * Does UNITS units of work. One unit = WORK iterations of integer arithmetic
 * (the "compiling") plus TOUCHES writes to random pages of everything allocated
 * so far (a compiler's or bundler's heap is walked all the time). During the
 * first GROW_PERCENT (default 40) of the units the heap grows in 4 MiB steps,
 * each step touched at once, up to MIB MiB; then it holds that size.
 * The memory is therefore live: when it does not fit in RAM the build faults
 * it back from swap over and over, like a real one.
 *
 * Prints one line when done: units, MiB, seconds. Exit 0.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define STEP (4UL << 20)
#define PAGE 4096UL
#define WORK 2000
#define TOUCHES 16

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bgbuild MIB UNITS [GROW_PERCENT]\n");
        return 2;
    }
    unsigned long mib = strtoul(argv[1], NULL, 10);
    unsigned long units = strtoul(argv[2], NULL, 10);
    unsigned long grow_pct = argc > 3 ? strtoul(argv[3], NULL, 10) : 40;
    unsigned long total = mib << 20;
    unsigned long nsteps = (total + STEP - 1) / STEP;
    unsigned long grow_units = units * grow_pct / 100;
    if (grow_units < 1) grow_units = 1;
    char *heap = mmap(NULL, nsteps * STEP, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (heap == MAP_FAILED) { perror("mmap"); return 1; }
    unsigned long have = 0;           /* bytes allocated and touched */
    uint64_t x = 0x9e3779b97f4a7c15ULL, acc = 0;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    printf("bgbuild: start %.3f\n", wall.tv_sec + wall.tv_nsec / 1e9);
    fflush(stdout);
    double t0 = now();
    for (unsigned long u = 0; u < units; u++) {
        unsigned long want = u >= grow_units ? nsteps : (u + 1) * nsteps / grow_units;
        while (have < want * STEP) {      /* grow: touch the new step */
            memset(heap + have, (int)(u & 0xff), STEP);
            have += STEP;
        }
        for (int i = 0; i < WORK; i++) {  /* compile */
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            acc ^= x >> 17;
        }
        unsigned long pages = have / PAGE;
        for (int i = 0; i < TOUCHES && pages; i++) {  /* walk the heap */
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            char *p = heap + ((x >> 11) % pages) * PAGE + (x & 0xff8);
            *p += (char)acc;
        }
    }
    printf("bgbuild: %lu units, %lu MiB, %.2f s (%lx)\n", units, mib, now() - t0, (unsigned long)(acc & 0xf));
    return 0;
}
