/* Opening a GPU backend by its device name (see att_gpu_open.h). Thread model: none of its own;
 * the backends' create functions are thread-safe. */
#include "attention/att_gpu_open.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#ifdef AT_HAVE_CUDA
#include "attention/att_cuda.h"
#endif
#ifdef AT_HAVE_HIP
#include "attention/att_hip.h"
#endif

at_err_t att_gpu_open(const char *device, uint32_t compile_threads, at_diag_t *diag,
                      att_backend_t **out) {
    const bool hip = strncmp(device, "hip:", 4) == 0;
    if (!hip && strncmp(device, "cuda:", 5) != 0)
        return at_diag_set(diag, AT_ERR_DEVICE_UNKNOWN, "device %s: expected cuda:N or hip:N",
                           device);
    const char *num = device + (hip ? 4 : 5);
    char *end = NULL;
    const long ordinal = strtol(num, &end, 10);
    if (end == num || *end != '\0' || ordinal < 0 || ordinal > 1024)
        return at_diag_set(diag, AT_ERR_DEVICE_UNKNOWN, "device %s: expected %s", device,
                           hip ? "hip:N" : "cuda:N");
    (void)compile_threads; /* unused in a build without either GPU backend */
    (void)out;
    if (hip) {
#ifdef AT_HAVE_HIP
        const att_hip_cfg_t hc = {.device = (int)ordinal, .compile_threads = compile_threads};
        return att_hip_create(&hc, diag, out);
#else
        return at_diag_set(diag, AT_ERR_DEVICE_UNKNOWN, "device %s: built without HIP", device);
#endif
    }
#ifdef AT_HAVE_CUDA
    const att_cuda_cfg_t cc = {.device = (int)ordinal, .compile_threads = compile_threads};
    return att_cuda_create(&cc, diag, out);
#else
    return at_diag_set(diag, AT_ERR_DEVICE_UNKNOWN, "device %s: built without CUDA", device);
#endif
}
