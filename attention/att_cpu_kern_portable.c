/* The CPU kernel for any target the compiler supports. */
#define ATT_CPU_KERN_NAME att_cpu__kern_portable
#include "attention/att_cpu_kern_impl.h"
