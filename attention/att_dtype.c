/* Names of element types. Pure; any thread. */
#include "attention/att_dtype.h"

const char *att_dtype_name(att_dtype_t t) {
    switch (t) {
    case ATT_DTYPE_F32: return "f32";
    case ATT_DTYPE_F16: return "f16";
    case ATT_DTYPE_BF16: return "bf16";
    default: return "unspecified";
    }
}
