/*
 * Test-only LD_PRELOAD shim for the sanlock daemon.
 *
 * The test machines run as root without CAP_SYS_RESOURCE and with a hard
 * RLIMIT_MEMLOCK of 8 MiB, so the daemon's setrlimit() calls for memlock and
 * rtprio fail and it refuses to start. The daemon runs in the tests without
 * watchdog, RT priority or mlockall (-w 0 -h 0 -l 0), so those limits do not
 * matter: report success when the real call fails. Never used in production.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>

typedef int (*setrlimit_fn)(__rlimit_resource_t, const struct rlimit *);

int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
    static setrlimit_fn real_setrlimit;

    if (!real_setrlimit)
        real_setrlimit = (setrlimit_fn)dlsym(RTLD_NEXT, "setrlimit");
    if (real_setrlimit)
        (void)real_setrlimit(resource, rlim);
    return 0;
}
