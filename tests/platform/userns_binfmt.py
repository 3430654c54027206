#!/usr/bin/env python3
"""(moat copy of the platform recipe, used by tests/platform/platform.sh arm64-*.)

Run a command in a private user+mount namespace that has its OWN binfmt_misc
instance with qemu-aarch64 registered, so arm64 binaries (and everything they
exec, e.g. dpkg maintainer scripts) run under qemu-user emulation.

Nothing global is changed: the host's /proc/sys/fs/binfmt_misc stays empty and
unregistered; the instance disappears with the last process of the namespace.
Needs Linux >= 6.7 (binfmt_misc mountable in a user namespace; this machine runs
6.18) and root (the parent writes an identity uid/gid map 0..65535, so files
owned by any uid in the rootfs keep their owners, and chown works).

usage: userns_binfmt.py [--pid] [--net] [--] COMMAND [ARGS...]
  --pid   also a new PID namespace (COMMAND is PID 1; lets it mount a fresh /proc)
  --net   also a new network namespace with only 'lo' (lets it mount sysfs; no
          network at all, e.g. for debootstrap --second-stage)
Exit status: that of COMMAND.
"""
import ctypes
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

QEMU = os.environ.get("QEMU_AARCH64_BINFMT", "/usr/libexec/qemu-binfmt/aarch64-binfmt-P")
FLAGS = os.environ.get("QEMU_AARCH64_FLAGS", "OPF")  # same as Debian's qemu-user-static
MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
NAME = "qemu-aarch64"
BINFMT_DIR = "/proc/sys/fs/binfmt_misc"

libc = ctypes.CDLL(None, use_errno=True)


def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def die_with_parent():
    """SIGKILL this process when the process that forked it exits."""
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


def forward_signals_to(pid, escalate=False):
    """Pass SIGTERM/SIGINT/SIGHUP on to pid. With escalate (pid is the init of a
    PID namespace, which ignores signals it has no handler for), send SIGKILL
    5 s later if it has not exited by then."""
    def kill(signum):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def handler(signum, _frame):
        kill(signum)
        if escalate:
            signal.signal(signal.SIGALRM, lambda *_: kill(signal.SIGKILL))
            signal.alarm(5)
    for sig in FORWARDED:
        signal.signal(sig, handler)


def wait_exit_code(pid):
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(st)
    return code if code >= 0 else 128 - code


def main(argv):
    pid_ns = net_ns = False
    while argv and argv[0].startswith("--"):
        a = argv.pop(0)
        if a == "--":
            break
        if a == "--pid":
            pid_ns = True
        elif a == "--net":
            net_ns = True
        else:
            sys.exit(__doc__)
    if not argv:
        sys.exit(__doc__)
    if os.geteuid() != 0:
        sys.exit("userns_binfmt.py: must run as root")
    if not os.path.exists(QEMU):
        sys.exit(f"userns_binfmt.py: {QEMU} missing (apt-get install qemu-user-static)")

    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    child = os.fork()
    if child == 0:
        die_with_parent()
        os.close(to_parent_r)
        os.close(to_child_w)
        flags = CLONE_NEWUSER | CLONE_NEWNS | (CLONE_NEWNET if net_ns else 0)
        check(libc.unshare(flags), "unshare(user|mnt)")
        os.write(to_parent_w, b"u")
        if os.read(to_child_r, 1) != b"m":  # parent wrote our uid/gid maps
            os._exit(125)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        check(libc.mount(b"binfmt_misc", BINFMT_DIR.encode(), b"binfmt_misc", 0, None),
              "mount binfmt_misc (kernel >= 6.7 needed)")
        with open(os.path.join(BINFMT_DIR, "register"), "w") as f:
            f.write(f":{NAME}:M::{MAGIC}:{MASK}:{QEMU}:{FLAGS}")
        if net_ns:
            os.system("ip link set lo up 2>/dev/null")
        if pid_ns:
            check(libc.unshare(CLONE_NEWPID), "unshare(pid)")
            inner = os.fork()
            if inner != 0:
                forward_signals_to(inner, escalate=True)
                os._exit(wait_exit_code(inner) & 0xFF)
            # PID 1 of the new namespace: when it dies, the kernel kills the whole namespace
            die_with_parent()
        # a background job may have inherited SIG_IGN: give COMMAND the default handlers
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"userns_binfmt.py: exec {argv[0]}: {e}", file=sys.stderr)
            os._exit(127)

    os.close(to_parent_w)
    os.close(to_child_r)
    forward_signals_to(child)
    if os.read(to_parent_r, 1) != b"u":
        sys.exit(wait_exit_code(child) or 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{child}/{name}", "w") as f:
            f.write("0 0 65536\n")
    os.write(to_child_w, b"m")
    sys.exit(wait_exit_code(child))


if __name__ == "__main__":
    main(sys.argv[1:])
