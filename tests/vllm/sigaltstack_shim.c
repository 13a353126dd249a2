/* LD_PRELOAD shim for tests/test_amx.py: logs what decides whether Linux grants a process AMX tile permission.

   Appends to the file named by $UCM_SIGALTSTACK_LOG (nothing when unset), one record per event:
     SIZES pid=P sysconf_sigstksz=N at_minsigstksz=N                      (once per process, at load)
     SIGALTSTACK pid=P tid=T size=N rc=R errno=E name=THREAD_NAME         (every call that installs a stack)
     ARCH_PRCTL pid=P tid=T option=0x1023 arg=A rc=R errno=E name=THREAD_NAME
   each event record followed by its backtrace (backtrace_symbols_fd) and a line "END". Linux refuses
   ARCH_REQ_XCOMP_PERM (ENOSPC) while any thread has an alternate signal stack smaller than the AMX signal frame.
   Build: gcc -shared -fPIC -O1 -o sigaltstack_shim.so sigaltstack_shim.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AT_MINSIGSTKSZ
#define AT_MINSIGSTKSZ 51
#endif
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023

static __thread int in_log; /* backtrace() may allocate and load libgcc_s: never recurse */

static int log_fd(void) {
    static int fd = -2;
    if (fd == -2) {
        const char *path = getenv("UCM_SIGALTSTACK_LOG");
        fd = path ? open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : -1;
    }
    return fd;
}

static void log_event(const char *fields) {
    int fd = log_fd();
    if (fd < 0 || in_log) return;
    in_log = 1;
    char name[32] = "?";
    pthread_getname_np(pthread_self(), name, sizeof name);
    char line[512];
    int n = snprintf(line, sizeof line, "%s name=%s\n", fields, name);
    if (n > 0 && write(fd, line, n) < 0) goto out;
    void *frames[48];
    backtrace_symbols_fd(frames, backtrace(frames, 48), fd);
    if (write(fd, "END\n", 4) < 0) goto out;
out:
    in_log = 0;
}

int sigaltstack(const stack_t *ss, stack_t *old) {
    static int (*next)(const stack_t *, stack_t *);
    if (!next) next = (int (*)(const stack_t *, stack_t *))dlsym(RTLD_NEXT, "sigaltstack");
    int rc = next(ss, old), err = errno;
    if (ss && !(ss->ss_flags & SS_DISABLE)) {
        char fields[256];
        snprintf(fields, sizeof fields, "SIGALTSTACK pid=%d tid=%ld size=%zu rc=%d errno=%d", getpid(),
                 (long)syscall(SYS_gettid), ss->ss_size, rc, err);
        log_event(fields);
    }
    errno = err;
    return rc;
}

/* libc's syscall(): catches SYS_sigaltstack and SYS_arch_prctl made through it (oneDNN, torch, ctypes). */
long syscall(long number, ...) {
    static long (*next)(long, ...);
    if (!next) next = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    va_list ap;
    va_start(ap, number);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    long rc = next(number, a[0], a[1], a[2], a[3], a[4], a[5]);
    int err = errno;
    char fields[256];
    if (number == SYS_sigaltstack && a[0] && !(((const stack_t *)a[0])->ss_flags & SS_DISABLE)) {
        snprintf(fields, sizeof fields, "SIGALTSTACK pid=%d tid=%ld size=%zu rc=%ld errno=%d", getpid(),
                 (long)syscall(SYS_gettid), ((const stack_t *)a[0])->ss_size, rc, err);
        log_event(fields);
    } else if (number == SYS_arch_prctl && (a[0] == ARCH_GET_XCOMP_PERM || a[0] == ARCH_REQ_XCOMP_PERM)) {
        snprintf(fields, sizeof fields, "ARCH_PRCTL pid=%d tid=%ld option=%#lx arg=%ld rc=%ld errno=%d", getpid(),
                 (long)syscall(SYS_gettid), a[0], a[0] == ARCH_REQ_XCOMP_PERM ? a[1] : 0L, rc, err);
        log_event(fields);
    }
    errno = err;
    return rc;
}

__attribute__((constructor)) static void log_sizes(void) {
    int fd = log_fd();
    if (fd < 0) return;
    char line[160];
    int n = snprintf(line, sizeof line, "SIZES pid=%d sysconf_sigstksz=%ld at_minsigstksz=%lu\n", getpid(),
                     sysconf(_SC_SIGSTKSZ), getauxval(AT_MINSIGSTKSZ));
    if (n > 0 && write(fd, line, n) < 0) return;
}
