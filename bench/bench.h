/* Benchmarks built into the attnd command. */
#ifndef AT_BENCH_BENCH_H
#define AT_BENCH_BENCH_H

/* `attnd bench [options]`: times the CPU attention backend on decode and prefill cases for one
 * model shape and sets the results against the machine's memory read bandwidth, measured in the
 * same run. argv[0] is the subcommand's name; `--help` lists the options. Results go to stdout (a
 * table, or one JSON document with --json), progress and errors to stderr.
 * Returns the process exit status: 0 on success, 1 when a measurement fails, 2 on bad usage.
 * Thread: main thread only (it starts and joins its own threads). */
int bench_cpu_main(int argc, char **argv);

/* `attnd bench-serve`: Attend over loopback against the cpu and null devices (bench_svc.c).
 * Returns the exit status. Thread: the main thread. */
int bench_svc_main(int argc, char **argv);

/* `attnd tune`: tunes a model preset's kernel configs for a range of batch shapes ahead of time
 * and writes the tuning store; `attnd tune --show` prints one (bench_tune.c). Returns the exit
 * status: 0, 1 when a shape or the store failed, 2 on bad usage. Thread: the main thread. */
int bench_tune_main(int argc, char **argv);

/* `attnd bench-gpu` (builds with the CUDA backend only): attention on cuda:0 against the
 * bandwidth and launch ceilings measured in the same run. */
int bench_gpu_main(int argc, char **argv);

#endif
