/* Project-wide basics: asserts for programmer mistakes and thread-safety annotations.
 * Header-only; every folder may include it, it includes no other folder. */
#ifndef AT_COMMON_AT_BASE_H
#define AT_COMMON_AT_BASE_H

#include <assert.h>

/* Programmer mistakes only; client input is validated and answered with an at_err_t. */
#define AT_ASSERT(cond) assert(cond)

#if defined(__clang__)
#define AT_CAPABILITY(x) __attribute__((capability(x)))
#define AT_GUARDED_BY(x) __attribute__((guarded_by(x)))
#define AT_REQUIRES(...) __attribute__((requires_capability(__VA_ARGS__)))
#define AT_EXCLUDES(...) __attribute__((locks_excluded(__VA_ARGS__)))
#else
#define AT_CAPABILITY(x)
#define AT_GUARDED_BY(x)
#define AT_REQUIRES(...)
#define AT_EXCLUDES(...)
#endif

#define AT_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Happens-before edges that ThreadSanitizer cannot see because they pass through a library built
 * without it (gRPC's completion queues): release an object before handing it to the library,
 * acquire it where the library hands it back. Nothing in other builds. */
#if defined(__SANITIZE_THREAD__)
#define AT_TSAN_ENABLED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define AT_TSAN_ENABLED 1
#endif
#endif
#ifdef AT_TSAN_ENABLED
#include <sanitizer/tsan_interface.h>
#define AT_TSAN_RELEASE(p) __tsan_release((void *)(p))
#define AT_TSAN_ACQUIRE(p) __tsan_acquire((void *)(p))
#else
#define AT_TSAN_RELEASE(p) ((void)(p))
#define AT_TSAN_ACQUIRE(p) ((void)(p))
#endif

#endif
