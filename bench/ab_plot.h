/* attnd-bench's plots: latency over time and a latency histogram of every phase and device,
 * drawn as PNG by gnuplot (Debian: gnuplot-nox) when it is on PATH. */
#ifndef AT_BENCH_AB_PLOT_H
#define AT_BENCH_AB_PLOT_H

#include "bench/ab_report.h"

/* Writes PREFIX.dat (one block per phase and device: seconds since the phase's start, latency
 * in ms, status), PREFIX-hist.dat and PREFIX.gp, then runs gnuplot on PREFIX.gp to draw
 * PREFIX-latency.png and PREFIX-histogram.png. Without gnuplot on PATH it says so on stderr and
 * draws nothing (the data files stay). Returns 0 (also when gnuplot is absent), or -1 after a
 * message when a file cannot be written or gnuplot fails. Thread: main, after the run. */
int ab_plot_write(const ab_report_t *r, const char *prefix);

#endif
