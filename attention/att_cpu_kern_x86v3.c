/* The CPU kernel for x86-64-v3 (AVX2, FMA, F16C); att_cpu picks it only on CPUs that have them. */
#define ATT_CPU_KERN_NAME att_cpu__kern_x86v3
#include "attention/att_cpu_kern_impl.h"
