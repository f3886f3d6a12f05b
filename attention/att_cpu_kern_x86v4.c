/* The CPU kernel for x86-64-v4 (AVX-512F/BW/CD/DQ/VL); att_cpu picks it only on CPUs that have
 * them. Same source: with 32 vector registers and EVEX encodings the compiler keeps more in
 * registers (measured 8% faster decode than the x86-64-v3 build on an AMD EPYC). */
#define ATT_CPU_KERN_NAME att_cpu__kern_x86v4
#include "attention/att_cpu_kern_impl.h"
