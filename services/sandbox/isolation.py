"""Linux isolation primitives through libc (ctypes): namespaces, mounts, prctl, rlimits, uid drop,
Landlock and seccomp. Nothing here imports transport code; the worker process calls these.

Every probe returns a `Layer` (active or not, and why), so the service can say at start-up exactly
which layers protect a run on this kernel and which do not.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# clone / unshare flags
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

# mount flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

# prctl options
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
SECCOMP_MODE_FILTER = 2

# Landlock (uapi/linux/landlock.h); the syscall numbers are the same on every architecture
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


@dataclass(frozen=True, slots=True)
class Layer:
    """One isolation layer as probed on this machine."""

    name: str
    active: bool
    detail: str


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


_libc.fork.restype = ctypes.c_int


def raw_fork() -> int:
    """fork(2) without CPython's fork hooks. os.fork() runs every `register_at_fork` callback in the
    child (random's reseed, threading's reset ...), which touches hundreds of objects and so copies
    hundreds of pages: about 0.5 ms and 200 page faults per run. The worker is single-threaded and
    holds no interpreter lock while ctypes calls out, so the child is consistent; it reseeds
    `random` itself."""
    pid = _libc.fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fork: {os.strerror(err)}")
    return pid


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    _check(
        _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(ctypes.c_int(option), *args), f"prctl({option})")


def set_parent_death_signal(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


class PreparedPrctl:
    """One prctl call with its ctypes arguments built once (in the worker): a run only makes the call.
    Building them in every run touches, and so copies, pages that the run would not touch otherwise."""

    def __init__(self, option: int, arg2: int = 0) -> None:
        self.what = f"prctl({option})"
        zero = ctypes.c_ulong(0)
        self.args = (ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero)

    def __call__(self) -> None:
        _check(_libc.prctl(*self.args), self.what)


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to this process, so it can find and reap every one."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_dumpable(flag: bool) -> None:
    """Non-dumpable: same-uid processes cannot ptrace it or read its /proc files (environ, mem)."""
    prctl(PR_SET_DUMPABLE, 1 if flag else 0)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> None:
    """Clear every capability of this process (capset to zero, v3 layout: two 32-bit words). Used by
    a worker that runs without root inside its own user namespace, where unshare() handed it all
    capabilities of that namespace: its runs must not inherit them."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def enter_namespaces(tmpfs_dir: str, tmpfs_mb: int, max_inodes: int) -> tuple[Layer, Layer]:
    """Private network and mount namespaces for this process and every run it forks.

    As root: CLONE_NEWNET | CLONE_NEWNS. Otherwise the same inside a new user namespace (uid mapped
    to itself). The new network namespace has only a loopback device, left down: no route anywhere.
    The mount namespace carries a size-capped tmpfs at `tmpfs_dir` that holds the run directories.
    """
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET
    how = "as root" if uid == 0 else "in a user namespace"
    try:
        unshare(flags if uid == 0 else CLONE_NEWUSER | flags)
    except OSError as exc:
        reason = f"unshare refused ({exc.strerror}); runs share the host network"
        return Layer("network namespace", False, reason), Layer("tmpfs quota", False, "no mount namespace")
    if uid != 0:  # in the new user namespace: map our ids to themselves (a failure here is fatal)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    net = Layer("network namespace", True, f"private, loopback down ({how})")
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        data = f"size={tmpfs_mb}m,nr_inodes={max_inodes},mode=0711"
        mount("psgpo-sandbox", tmpfs_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, data)
    except OSError as exc:
        return net, Layer("tmpfs quota", False, f"mount failed ({exc.strerror})")
    return net, Layer("tmpfs quota", True, f"run dirs on a private {tmpfs_mb} MiB tmpfs, {max_inodes} inodes")


def bind_readonly(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    mount(source, target, None, MS_BIND | MS_REC, None)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def apply_worker_rlimits(file_size: int, open_files: int, processes: int) -> None:
    """The limits that are the same for every run, set once on the worker and inherited: largest
    file, open files, tasks (RLIMIT_NPROC, counted per uid; root itself ignores it), no core dumps,
    no locked memory, no POSIX message queues."""
    for which, value in (
        (resource.RLIMIT_FSIZE, file_size),
        (resource.RLIMIT_NOFILE, open_files),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ):
        resource.setrlimit(which, (value, value))


def apply_run_rlimits(address_space: int, cpu_seconds: int) -> None:
    """Per run: address space (the worker's own plus the run's memory limit) and CPU seconds (the
    soft limit sends SIGXCPU, the hard one SIGKILL; the wall-clock deadline usually comes first)."""
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


# ---------------------------------------------------------------------------------------------- Landlock


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    version = LANDLOCK_CREATE_RULESET_VERSION
    ret = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), version)
    return max(int(ret), 0)


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class LandlockRuleset:
    """A ruleset built once in the worker: read-only trees and devices, and full access to the one
    directory the worker's runs write to (the same inode every run; the worker empties it). A run
    only has to call landlock_restrict_self. What it restricts: the filesystem to those rules, TCP
    bind/connect entirely (ABI 4), signals and abstract unix sockets to the run's own processes
    (ABI 6)."""

    def __init__(self, abi: int, read_roots: list[str], devices: dict[str, int], writable_dir: str) -> None:
        fs = _fs_rights(abi)
        attr = _RulesetAttr(fs, 0, 0)
        size = 8
        if abi >= 4:
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
            size = 16
        if abi >= 6:
            attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            size = 24
        self.abi = abi
        self.fd = _check(
            _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
            "landlock_create_ruleset",
        )
        os.set_inheritable(self.fd, False)
        for path in read_roots:
            if os.path.isdir(path):
                self._add(path, FS_READ)
        for path, rights in devices.items():
            if os.path.exists(path):
                self._add(path, rights & fs & FS_FILE_RIGHTS)
        self._add(writable_dir, fs & ~FS_EXECUTE & ~FS_MAKE_CHAR & ~FS_MAKE_BLOCK)

    def _add(self, path: str, rights: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            attr = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr is packed
            buf = ctypes.create_string_buffer(attr, len(attr))
            _check(
                _libc.syscall(SYS_LANDLOCK_ADD_RULE, self.fd, LANDLOCK_RULE_PATH_BENEATH, buf, 0),
                f"landlock_add_rule {path}",
            )
        finally:
            os.close(fd)

    def restrict_self(self) -> None:
        """Apply to this process and everything it forks from now on (needs no_new_privs first)."""
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, self.fd, 0), "landlock_restrict_self")


def describe_landlock(abi: int) -> Layer:
    if abi <= 0:
        return Layer("landlock", False, "not available in this kernel (or disabled)")
    parts = ["filesystem read-only except the run dir"]
    parts.append("TCP bind/connect denied" if abi >= 4 else "no TCP rules (ABI < 4)")
    scoped = "signals and abstract sockets scoped to the run"
    parts.append(scoped if abi >= 6 else "no signal scoping (ABI < 6)")
    return Layer("landlock", True, f"ABI {abi}: " + ", ".join(parts))


# ---------------------------------------------------------------------------------------------- seccomp

LIBSECCOMP_NAMES = ("libseccomp.so.2", "libseccomp.so")
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE = 1
SCMP_CMP_MASKED_EQ = 7
AF_UNIX = 1


def _scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


# Refused with EPERM to the worker and every run (installed once on the worker, inherited): tracing
# other processes, namespaces and mounts, kernel modules and keys, persistent SysV/POSIX IPC objects
# (they would outlive the run), io_uring (it bypasses seccomp), clock and host changes. Plus:
# namespaced clone(), clone3 (ENOSYS: glibc falls back to clone, whose flags a filter can see),
# sockets other than AF_UNIX, kill(-1). Not here: setsid/setpgid (a run that leaves its process
# group is still found and killed by the worker's subreaper sweep) and set*id (a run has no
# capabilities left to use them).
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsmount", "fsconfig",
    "move_mount", "open_tree", "fspick", "mount_setattr", "personality",
    "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "acct", "swapon", "swapoff", "syslog", "quotactl", "open_by_handle_at", "name_to_handle_at",
    "lookup_dcookie", "iopl", "ioperm", "fanotify_init", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "shmget", "semget", "msgget", "mq_open",
)  # fmt: skip


def _load_libseccomp() -> ctypes.CDLL | None:
    for name in LIBSECCOMP_NAMES:  # by soname: ctypes.util.find_library would cost every run 1.4 MB
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        return lib
    return None


def _compile_filter(lib: ctypes.CDLL) -> bytes:
    """The filter compiled by libseccomp and exported as a BPF program."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    eperm = _scmp_act_errno(errno.EPERM)
    try:

        def rule(action: int, syscall: str, *cmps: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(syscall.encode())
            if nr < 0:
                return  # not on this architecture
            array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            ret = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
            if ret < 0:
                raise OSError(-ret, f"seccomp rule for {syscall}: {os.strerror(-ret)}")

        for syscall in DENIED:
            rule(eperm, syscall)
        rule(_scmp_act_errno(errno.ENOSYS), "clone3")
        for flag in NAMESPACE_FLAGS:
            rule(eperm, "clone", _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        rule(_scmp_act_errno(errno.EACCES), "socket", _ArgCmp(0, SCMP_CMP_NE, AF_UNIX, 0))
        minus_one = 0xFFFFFFFF
        rule(eperm, "kill", _ArgCmp(0, SCMP_CMP_MASKED_EQ, minus_one, minus_one))
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            ret = lib.seccomp_export_bpf(ctx, fd)
            if ret < 0:
                raise OSError(-ret, f"seccomp_export_bpf: {os.strerror(-ret)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def build_seccomp_filter() -> tuple[SeccompProgram | None, Layer]:
    """The filter (installed once on the worker, inherited by every run) and its description, built
    with libseccomp through ctypes; None when libseccomp is missing."""
    lib = _load_libseccomp()
    if lib is None:
        return None, Layer("seccomp", False, "libseccomp not found (install libseccomp2)")
    try:
        program = SeccompProgram(_compile_filter(lib))
    except OSError as exc:
        return None, Layer("seccomp", False, str(exc))
    detail = f"{len(DENIED)} syscalls, namespaced clone, non-AF_UNIX sockets and kill(-1) refused"
    return program, Layer("seccomp", True, detail)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """An exported BPF program, laid out once in the worker; a run loads it with one prctl."""

    def __init__(self, bpf: bytes) -> None:
        self.buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self.prog = _SockFprog(len(bpf) // 8, ctypes.cast(self.buffer, ctypes.c_void_p))

    def apply(self) -> None:
        """Load into this single-threaded process; needs no_new_privs first."""
        _check(
            _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(self.prog), 0, 0),
            "prctl(PR_SET_SECCOMP)",
        )
