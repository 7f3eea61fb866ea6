/* The worker's side of one run, after the fork: watch, kill, reap (services/sandbox/native.py).
 *
 * The same steps as Executor._supervise and Executor._reap_all in executor.py, in C: the worker's
 * Python code for them cost ~0.2 ms of CPU per run (~6% of a HumanEval run), most of it in the pages
 * it touched while the run was alive. Build: `python -m services.sandbox.native` (make setup does).
 *
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
