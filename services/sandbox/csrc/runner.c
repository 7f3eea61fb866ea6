/* One run, from the worker's side, in C (services/sandbox/native.py): the fork and the run's isolation
 * steps (psgpo_fork_run), then watch, kill, reap (psgpo_watch). The same steps as Executor._isolate,
 * Executor._supervise and Executor._reap_all in executor.py, which the worker uses when this is not
 * built. Build: `python -m services.sandbox.native` (make setup does).
 *
 * psgpo_fork_run, in the child, before any Python code of the run: its own session, the run dir,
 * RLIMIT_AS and RLIMIT_CPU, Landlock (when the worker prepared a ruleset), the run's uid and gid (when
 * given), SIGKILL when the worker dies, the check that the worker is still its parent, the pipes on
 * 0, 1, 2 and the result fd, every other fd closed. A step that fails writes one line to the stderr
 * pipe and exits 125 (the worker reports a sandbox error). Returns the pid in the worker, 0 in the
 * isolated child, -errno when fork fails.
 *
 * psgpo_watch:
 *   - read the run's stdout, stderr and result pipes into the caller's buffers, each up to its cap;
 *     one byte over a cap ends the watch (that stream is reported);
 *   - SIGKILL the run's process group at the deadline (CLOCK_MONOTONIC, as Python's time.monotonic);
 *   - when the run's process exits: collect its status, kill its group, and drain the pipes for at
 *     most `drain_s` (a child it left may still hold them);
 *   - at the end: kill the group again, and reap every process: the run and whatever was re-parented
 *     to this process (a child subreaper), killing the groups of those still alive.
 *
 * out[0] exit code (-1: none), out[1] signal (0: none), out[2] 1 when the deadline passed,
 * out[3] the stream over its cap (0 stdout, 1 stderr, 2 result; -1 none), out[4..6] bytes read.
 * Returns 0, or -errno when the run could not be watched at all (pidfd_open failed); the pipes are
 * closed in every case.
 */
#define _GNU_SOURCE
#include <grp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446
#endif
#define SETUP_FAILED 125

static void setup_failed(int err_fd, const char *step) {
    char line[256];
    int n = snprintf(line, sizeof line, "sandbox setup failed: %s: %s\n", step, strerror(errno));
    if (n > 0 && write(err_fd, line, (size_t)n) < 0) { /* nothing more to say */ }
    _exit(SETUP_FAILED);
}

/* fds: the run's stdin, stdout, stderr and result pipe ends; uid < 0 keeps the worker's ids. */
long psgpo_fork_run(const int *fds, int result_fd, const char *run_dir, long address_space,
                    long cpu_seconds, int landlock_fd, long uid, long worker_pid) {
    pid_t pid = fork();
    if (pid < 0) return -errno;
    if (pid > 0) return pid;
    int err = fds[2];
    if (setsid() < 0) setup_failed(err, "setsid");
    if (chdir(run_dir) < 0) setup_failed(err, "chdir to the run dir");
    struct rlimit as = {(rlim_t)address_space, (rlim_t)address_space};
    struct rlimit cpu = {(rlim_t)cpu_seconds, (rlim_t)cpu_seconds + 1};
    if (setrlimit(RLIMIT_AS, &as) < 0) setup_failed(err, "RLIMIT_AS");
    if (setrlimit(RLIMIT_CPU, &cpu) < 0) setup_failed(err, "RLIMIT_CPU");
    if (landlock_fd >= 0 && syscall(SYS_landlock_restrict_self, landlock_fd, 0) < 0)
        setup_failed(err, "landlock_restrict_self");
    if (uid >= 0) {
        if (setgroups(0, NULL) < 0) setup_failed(err, "setgroups");
        if (setresgid((gid_t)uid, (gid_t)uid, (gid_t)uid) < 0) setup_failed(err, "setresgid");
        if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0) setup_failed(err, "setresuid");
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) setup_failed(err, "PR_SET_PDEATHSIG");  /* after the uid change, which clears it */
    if (getppid() != (pid_t)worker_pid) {
        errno = ESRCH;
        setup_failed(err, "the worker died while the run started");
    }
    int targets[4] = {0, 1, 2, result_fd};
    for (int i = 0; i < 4; i++)
        if (dup2(fds[i], targets[i]) < 0) setup_failed(err, "dup2");
    if (syscall(SYS_close_range, (unsigned)result_fd + 1, ~0U, 0) < 0) {
        long top = sysconf(_SC_OPEN_MAX);
        for (long fd = result_fd + 1; fd < (top > 0 ? top : 1024); fd++) close((int)fd);
    }
    return 0;
}

#define CHUNK 65536

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void kill_group(long pid) {
    kill((pid_t)-pid, SIGKILL);
    kill((pid_t)pid, SIGKILL);
}

static void record(long *out, int status) {
    if (WIFEXITED(status)) {
        out[0] = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        out[1] = WTERMSIG(status);
    }
}

static int unrecorded(const long *out) { return out[0] == -1 && out[1] == 0; }

/* Kill the group of every child of this process. From /proc/<pid>/task/<pid>/children when the
 * kernel has it, else by scanning /proc for processes whose parent is this one. */
static void kill_children(void) {
    char path[64], buf[8192];
    pid_t me = getpid();
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)me, (int)me);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n >= 0) {
            buf[n] = 0;
            for (char *p = buf, *end;; p = end) {
                long child = strtol(p, &end, 10);
                if (end == p) return;
                kill_group(child);
            }
        }
    }
    DIR *proc = opendir("/proc");
    if (proc == NULL) return;
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(entry->d_name, &end, 10);
        if (end == entry->d_name || *end) continue;
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        char *close_paren = strrchr(buf, ')');  /* the command name may hold spaces and parens */
        char state;
        long parent;
        if (close_paren && sscanf(close_paren + 1, " %c %ld", &state, &parent) == 2 && parent == me)
            kill_group(pid);
    }
    closedir(proc);
}

static void reap_all(long pid, long *out) {
    for (;;) {
        int status;
        pid_t got = waitpid(-1, &status, WNOHANG);
        if (got < 0) {
            if (errno == EINTR) continue;
            return;  /* ECHILD: nothing left */
        }
        if (got == (pid_t)pid && unrecorded(out)) record(out, status);
        if (got != 0) continue;
        kill_children();
        got = waitpid(-1, &status, 0);
        if (got < 0 && errno != EINTR) return;
        if (got == (pid_t)pid && unrecorded(out)) record(out, status);
    }
}

int psgpo_watch(long pid, const int *fds, char *const *bufs, const long *caps, double deadline,
                double drain_s, long *out) {
    out[0] = -1;
    out[1] = 0;
    out[2] = 0;
    out[3] = -1;
    out[4] = out[5] = out[6] = 0;
    int result = 0;
    int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
    if (pidfd < 0) {
        result = -errno;
        goto finish;
    }
    struct pollfd polled[4];
    for (int i = 0; i < 3; i++) {
        polled[i].fd = fds[i];
        polled[i].events = POLLIN;
    }
    polled[3].fd = pidfd;
    polled[3].events = POLLIN;
    int open_pipes = 3, exited = 0;
    double drain_until = 0.0;
    for (;;) {
        double t = now();
        if (exited && (open_pipes == 0 || t >= drain_until)) break;
        if (!exited && t >= deadline) {
            out[2] = 1;
            break;
        }
        double stop = exited ? drain_until : deadline;
        int ready = poll(polled, 4, (int)((stop - t) * 1000.0) + 1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (polled[3].fd >= 0 && polled[3].revents) {
            int status;
            if (waitpid((pid_t)pid, &status, WNOHANG) == (pid_t)pid) record(out, status);
            kill_group(pid);  /* end of run: whatever it left behind dies now */
            polled[3].fd = -1;
            exited = 1;
            drain_until = now() + drain_s;
        }
        for (int i = 0; i < 3; i++) {
            if (polled[i].fd < 0 || !polled[i].revents) continue;
            long room = caps[i] + 1 - out[4 + i];  /* one byte past the cap is enough to know */
            ssize_t n = read(polled[i].fd, bufs[i] + out[4 + i], room > CHUNK ? CHUNK : (size_t)room);
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (n <= 0) {
                polled[i].fd = -1;
                open_pipes--;
                continue;
            }
            out[4 + i] += n;
            if (out[4 + i] > caps[i]) {
                out[3] = i;
                out[4 + i] = caps[i];
                goto done;
            }
        }
    }
done:
    close(pidfd);
finish:
    kill_group(pid);
    reap_all(pid, out);
    for (int i = 0; i < 3; i++) close(fds[i]);
    return result;
}
