#!/usr/bin/env python3
"""A real systemd + cgroup v2 Debian 12 guest under qemu, for end-to-end tests.

    e2e/vm.py build            build the guest image (once per recipe; cached)
    e2e/vm.py install          put the current checkout on the guest's data disk
    e2e/vm.py up               boot the VM in the background, wait until it is ready
    e2e/vm.py ssh [-t S] CMD   run CMD in the guest as root, return its exit code
    e2e/vm.py down             shut the VM down (idempotent)
    e2e/vm.py run [-t S] CMD   up + ssh CMD + down (down guaranteed)
    e2e/vm.py smoke            up + e2e/smoke.sh in the guest + down
    e2e/vm.py pytest [ARGS]    up + pytest ARGS on the installed checkout + down
    e2e/vm.py status           what is built, installed and running
    e2e/vm.py sync             copy the checkout into the running VM (no reboot)

Python 3 standard library only; run it as root on a Debian/Ubuntu host (it
apt-installs qemu, qemu-utils and debootstrap when they are missing). See
e2e/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("BGVM_CACHE", "/var/cache/buildgate-e2e"))
STATE = Path(os.environ.get("BGVM_STATE", "/var/lib/buildgate-e2e"))
PROG = "vm.py"

# --------------------------------------------------------------------------
# The recipe. Everything in it (and the dependencies in pyproject.toml) goes
# into the image hash: change any of it and `build` makes a new image.
# --------------------------------------------------------------------------
RECIPE_VERSION = 1
SUITE = "bookworm"
ARCH = "amd64"
IMAGE_SIZE_MIB = 6144          # sparse raw ext4; the guest's / (room for test builds)
DATA_MIN_MIB = 64              # the data disk (checkout + installed package)
SWAP_MIB = 1024                # /swapfile, off by default: `swapon /swapfile`
GUEST_MEM_MIB = 1536
GUEST_CPUS = 2
HOSTNAME = "bgvm"
VENV = "/opt/buildgate-venv"
DATA_MNT = "/opt/buildgate-data"    # data disk (/dev/vdb): src/ and pkg/
SRC_LINK = "/opt/buildgate-src"     # -> /opt/buildgate-data/src

DEBOOTSTRAP_INCLUDE = ["ca-certificates"]
PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "libpam-systemd", "kmod",
    "openssh-server", "linux-image-amd64", "initramfs-tools",
    "python3", "python3-venv", "python3-dev", "gcc", "libsystemd-dev", "pkg-config",
    "procps", "util-linux", "iproute2", "psmisc", "less",
]
# Preinstalled in the guest venv (pystemd compiles from source: slow, so here
# and only here); buildgate's own dependencies from pyproject.toml are added.
PIP_TOOLS = ["pip", "setuptools", "wheel"]
PIP_PACKAGES = ["pystemd", "psutil", "click", "pytest"]

FILES = {
    "/etc/hostname": f"{HOSTNAME}\n",
    "/etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "/etc/machine-id": "5b0a9d4e2c7f4e51a1c3b7d8e9f0a6b2\n",
    "/etc/fstab": (
        "/dev/vda  /  ext4  rw,errors=remount-ro  0 0\n"
        f"/dev/vdb  {DATA_MNT}  ext4  rw,nofail,x-systemd.device-timeout=30s  0 0\n"
        "# swap is off by default; tests turn it on with `swapon /swapfile`\n"
        "/swapfile  none  swap  sw,noauto  0 0\n"
    ),
    # user-mode networking: a static address and no gateway (the guest reaches
    # nothing; qemu forwards 127.0.0.1:PORT on the host to its port 22). A oneshot
    # instead of systemd-networkd: networkd costs ~7s of boot under TCG.
    "/etc/systemd/system/bgvm-net.service": (
        "[Unit]\nDescription=eth0 at 10.0.2.15/24 (qemu user networking)\n"
        "BindsTo=sys-subsystem-net-devices-eth0.device\n"
        "After=sys-subsystem-net-devices-eth0.device\n"
        "Before=network.target\nWants=network.target\n\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=/sbin/ip addr replace 10.0.2.15/24 dev eth0\n"
        "ExecStart=/sbin/ip link set eth0 up\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
    # a small initramfs (the default MODULES=most is 36M: slow to unpack under TCG)
    "/etc/initramfs-tools/conf.d/bgvm.conf": "MODULES=list\n",
    "/etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\next4\n",
    "/etc/ssh/sshd_config.d/bgvm.conf": (
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUseDNS no\nMaxStartups 50\n"
        "ClientAliveInterval 30\nClientAliveCountMax 10\n"
    ),
    "/etc/systemd/journald.conf.d/bgvm.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n",
    "/etc/systemd/system.conf.d/bgvm.conf": "[Manager]\nDefaultTimeoutStopSec=15s\n",
    "/etc/profile.d/bgvm.sh": f"export PATH=\"$PATH:{VENV}/bin\"\n",
    "/etc/motd": "",
}

CONFIGURE = r"""
set -euxo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 HOME=/root
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
apt-get update
apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold $BGVM_PACKAGES
grep -qx ext4 /etc/initramfs-tools/modules   # ours, not the package's
ls /boot/vmlinuz-* /boot/initrd.img-*

python3 -m venv @VENV@
@VENV@/bin/pip install --upgrade $BGVM_PIP_TOOLS
eval "pip_pkgs=($BGVM_PIP_PACKAGES)"   # shell-quoted: markers hold spaces
@VENV@/bin/pip install "${pip_pkgs[@]}"
@VENV@/bin/python -c 'import pystemd, psutil, click, pytest; print("venv ok")'
# buildgate itself lives on the data disk (`vm.py install`): @DATA@/pkg holds it,
# installed with pip --target; the venv finds it through a .pth file.
mkdir -p @DATA@
purelib=$(@VENV@/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo @DATA@/pkg > "$purelib/buildgate-e2e.pth"
ln -sfn @DATA@/pkg/bin/buildgate @VENV@/bin/buildgate
ln -sfn @DATA@/pkg/bin/buildgate /usr/local/bin/buildgate
ln -sfn @DATA@/src @SRC@

systemctl enable bgvm-net.service ssh.service
systemctl mask getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer \
    systemd-networkd-wait-online.service
passwd -l root
rm -f /etc/ssh/ssh_host_*key*
ssh-keygen -A
rm -f /usr/sbin/policy-rc.d
rm -rf /var/lib/apt/lists/*
: > /etc/resolv.conf
""".replace("@VENV@", VENV).replace("@DATA@", DATA_MNT).replace("@SRC@", SRC_LINK)

# Bounds (seconds)
T_DEBOOTSTRAP = 1200
T_CONFIGURE = 1800
T_IMAGE = 600
T_INSTALL = 300
T_BANNER = 180
T_READY = 240
T_POWEROFF = 60
T_KILL = 15
T_SSH_DEFAULT = 1800
T_LOCK = 120


class Fail(Exception):
    """A one-line error for the user."""


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------
def now() -> float:
    return time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr, and in the state dir's vm.log."""
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
    try:
        STATE.mkdir(parents=True, exist_ok=True)
        with open(STATE / "vm.log", "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}\n")
    except OSError:
        pass


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def du(path: Path) -> int:
    """Bytes allocated on disk under path (sparse files count what they use)."""
    total = 0
    if path.is_file():
        return path.stat().st_blocks * 512
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def run_logged(cmd: list[str], logfile: Path, timeout: float, what: str,
               env: dict | None = None, cwd: str | None = None) -> None:
    """Run cmd with its output appended to logfile, in its own process group,
    killed as a group when it exceeds timeout."""
    with open(logfile, "a") as out:
        out.write(f"\n### {time.strftime('%H:%M:%S')} {what}: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=cwd)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as exc:
            kill_group(proc)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise Fail(f"{what} timed out after {timeout:.0f}s (log: {logfile})") from None
            raise
    if rc != 0:
        tail = tail_lines(logfile, 15)
        raise Fail(f"{what} failed (exit {rc}); log: {logfile}\n{tail}")


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def tail_lines(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


@contextlib.contextmanager
def flocked(path: Path, what: str, timeout: float = T_LOCK):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = now() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if now() > deadline:
                    raise Fail(f"another {what} holds {path} (waited {timeout:.0f}s)") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


def need_root() -> None:
    if os.geteuid() != 0:
        raise Fail("run me as root (debootstrap, chroot, mounts)")


HOST_TOOLS = {  # command -> Debian package
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "debootstrap": "debootstrap",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkswap": "util-linux",
}


def ensure_host_tools(commands: list[str]) -> None:
    missing = sorted({HOST_TOOLS[c] for c in commands if not shutil.which(c)
                      and not os.path.exists(f"/usr/sbin/{c}") and not os.path.exists(f"/sbin/{c}")})
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise Fail(f"missing host packages {' '.join(missing)} and no apt-get to install them")
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    hostlog = STATE / "host-apt.log"
    STATE.mkdir(parents=True, exist_ok=True)
    run_logged(["apt-get", "update"], hostlog, 600, "apt-get update", env=env)
    run_logged(["apt-get", "install", "-y", "--no-install-recommends", *missing], hostlog, 900,
               "apt-get install", env=env)


def tool(name: str) -> str:
    for p in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if p and os.path.exists(p):
            return p
    raise Fail(f"{name} not found")


# --------------------------------------------------------------------------
# recipe hash, cache layout
# --------------------------------------------------------------------------
def project_deps() -> list[str]:
    """What pyproject.toml asks for, baked into the guest venv: the runtime
    dependencies, the `test` extra and the build requirements (`install` builds
    the checkout there without build isolation and without network)."""
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11: a plain scan of the arrays
        found = []
        for key in ("dependencies", "test", "requires"):
            m = re.search(rf"^{key}\s*=\s*\[(.*?)\]", text, re.S | re.M)
            found += re.findall(r"\"([^\"]+)\"", m.group(1)) if m else []
        return sorted(set(found))
    data = tomllib.loads(text)
    project = data.get("project", {})
    found = list(project.get("dependencies", []))
    found += project.get("optional-dependencies", {}).get("test", [])
    found += data.get("build-system", {}).get("requires", [])
    return sorted(set(found))


def recipe() -> dict:
    return {
        "version": RECIPE_VERSION, "suite": SUITE, "arch": ARCH,
        "debootstrap_include": DEBOOTSTRAP_INCLUDE, "packages": PACKAGES,
        "pip_tools": PIP_TOOLS, "pip_packages": PIP_PACKAGES + project_deps(),
        "files": FILES, "configure": CONFIGURE,
        "image_mib": IMAGE_SIZE_MIB, "swap_mib": SWAP_MIB,
    }


def recipe_hash() -> str:
    blob = json.dumps(recipe(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def base_dir(h: str | None = None) -> Path:
    return CACHE / f"base-{h or recipe_hash()}"


def key_path(base: Path) -> Path:
    return base / "id_ed25519"


def host_mirrors() -> tuple[str, str]:
    """The Debian and Debian-security mirrors this host's apt uses."""
    main, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.suffix in (".list", ".sources") or p.name == "sources.list":
            with contextlib.suppress(OSError):
                texts.append(p.read_text())
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.findall(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = " ".join(re.findall(r"^Suites:\s*(.+)$", stanza, re.M)).split()
            for line in stanza.splitlines():  # one-line format
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    uris, suites = [m.group(1)], [m.group(2)]
                    break
            if not uris:
                continue
            if f"{SUITE}-security" in suites:
                security = uris[0].rstrip("/")
            elif SUITE in suites:
                main = uris[0].rstrip("/")
    return main, security


# --------------------------------------------------------------------------
# chroot mounts, handled with care: nothing is ever deleted through a mount
# --------------------------------------------------------------------------
def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt.startswith(prefix) or mnt == prefix[:-1]:
                found.append(mnt)
    return found


def umount_all(path: Path) -> None:
    for mnt in sorted(mounts_under(path), key=len, reverse=True):
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    left = mounts_under(path)
    if left:
        raise Fail(f"could not unmount {', '.join(left)}")


def safe_rmtree(path: Path) -> None:
    if not path.exists():
        return
    kill_chroot_procs(path)
    umount_all(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def kill_chroot_procs(root: Path) -> None:
    """Kill processes whose root directory is inside root (a daemon a package
    script may have started in the chroot), by pid."""
    target = str(root.resolve())
    for _ in range(3):
        victims = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                r = os.readlink(f"/proc/{d}/root")
            except OSError:
                continue
            if r == target or r.startswith(target + "/"):
                victims.append(int(d))
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@contextlib.contextmanager
def chroot_mounts(rootfs: Path, binds: dict[str, Path]):
    """proc, sysfs, a private devpts, and bind mounts of host cache dirs; always undone."""
    try:
        for fstype, dst, opts in (("proc", "proc", []), ("sysfs", "sys", []),
                                  ("devpts", "dev/pts", ["-o", "newinstance,ptmxmode=0666,gid=5,mode=620"])):
            (rootfs / dst).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", fstype, *opts, fstype, str(rootfs / dst)], check=True)
        for inside, host in binds.items():
            host.mkdir(parents=True, exist_ok=True)
            dst = rootfs / inside.lstrip("/")
            dst.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(host), str(dst)], check=True)
        yield
    finally:
        kill_chroot_procs(rootfs)
        umount_all(rootfs)


# --------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------
def cmd_build(args) -> int:
    need_root()
    ensure_host_tools(["debootstrap", "mkfs.ext4", "debugfs", "ssh-keygen", "mkswap", "qemu-img"])
    h = recipe_hash()
    base = base_dir(h)
    with flocked(CACHE / "build.lock", "build/install"):
        rec = read_vm()
        if vm_alive(rec) and rec.get("base") == base.name and args.force:
            raise Fail("the running VM uses this image: `e2e/vm.py down` first")
        if (base / "READY").exists() and not args.force:
            log(f"image {base.name} is up to date ({human(du(base))} in {base})")
            return 0
        t0 = now()
        log(f"building image {base.name} in {base} (log: {base}/build.log)")
        safe_rmtree(base)
        base.mkdir(parents=True)
        blog = base / "build.log"
        (base / "recipe.json").write_text(json.dumps(recipe(), indent=2, sort_keys=True) + "\n")
        rootfs = base / "rootfs"
        main, security = host_mirrors()

        # 1. debootstrap
        t = now()
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        run_logged([tool("debootstrap"), "--variant=minbase", f"--arch={ARCH}",
                    f"--include={','.join(DEBOOTSTRAP_INCLUDE)}", f"--cache-dir={debs}",
                    SUITE, str(rootfs), main], blog, T_DEBOOTSTRAP, "debootstrap")
        log(f"  debootstrap: {now() - t:.0f}s")

        # 2. configure in the chroot
        t = now()
        subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "bgvm-e2e",
                        "-f", str(key_path(base))], check=True)
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {main} {SUITE} main\ndeb {main} {SUITE}-updates main\n"
            f"deb {security} {SUITE}-security main\n")
        for path, content in FILES.items():
            dst = rootfs / path.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink():
                dst.unlink()
            dst.write_text(content)
        sshdir = rootfs / "root/.ssh"
        sshdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (sshdir / "authorized_keys").write_text((base / "id_ed25519.pub").read_text())
        os.chmod(sshdir / "authorized_keys", 0o600)
        # PyPI through this host's CA bundle (a TLS proxy may sit in between)
        ca = rootfs / "tmp/host-ca.crt"
        for cand in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                     "/etc/ssl/certs/ca-certificates.crt"):
            if cand and os.path.isfile(cand):
                shutil.copy(cand, ca)
                break
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
            "BGVM_PACKAGES": " ".join(PACKAGES),
            "BGVM_PIP_TOOLS": " ".join(PIP_TOOLS),
            "BGVM_PIP_PACKAGES": " ".join(shlex.quote(p) for p in PIP_PACKAGES + project_deps()),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "120",
        }
        if ca.exists():
            env["PIP_CERT"] = "/tmp/host-ca.crt"
        binds = {"/var/cache/apt/archives": CACHE / "apt-archives", "/root/.cache/pip": CACHE / "pip"}
        with chroot_mounts(rootfs, binds):
            run_logged(["chroot", str(rootfs), "/bin/bash", "-c", CONFIGURE], blog, T_CONFIGURE,
                       "configure (chroot)", env=env)
        ca.unlink(missing_ok=True)
        for inside in (*binds, "/root/.cache"):   # the now empty mount points
            with contextlib.suppress(OSError):
                (rootfs / inside.lstrip("/")).rmdir()
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise Fail(f"no kernel/initrd in {rootfs}/boot")
        shutil.copy(kernels[-1], base / "vmlinuz")
        shutil.copy(initrds[-1], base / "initrd.img")
        log(f"  configure: {now() - t:.0f}s ({kernels[-1].name})")

        # 3. the raw ext4 image, then the swap file (allocated, not written)
        t = now()
        make_root_image(rootfs, base / "base.img", blog)
        log(f"  image: {now() - t:.0f}s")

        (base / "READY").write_text(json.dumps({"built": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                "seconds": round(now() - t0)}) + "\n")
        log(f"built {base.name} in {now() - t0:.0f}s ({human(du(base))})")
        prune_old(base)
    return 0


def make_root_image(rootfs: Path, img: Path, blog: Path) -> None:
    tmp = img.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as fh:
        fh.truncate(IMAGE_SIZE_MIB * 1024 * 1024)
    run_logged([tool("mkfs.ext4"), "-F", "-q", "-L", "bgroot", "-E", "root_owner=0:0",
                "-d", str(rootfs), str(tmp)], blog, T_IMAGE, "mkfs.ext4 (root)")
    # mke2fs -d skips zero blocks, so a swap file copied in would have holes and
    # swapon refuses those. Instead: the mkswap header as block 0, then the rest
    # allocated as unwritten extents (what fallocate(1) does; swapon accepts them).
    with tempfile.TemporaryDirectory(dir=CACHE) as td:
        sw = Path(td) / "swap"
        with open(sw, "wb") as fh:
            fh.truncate(SWAP_MIB * 1024 * 1024)
        subprocess.run([tool("mkswap"), "-L", "bgswap", str(sw)], check=True, capture_output=True)
        hdr = Path(td) / "hdr"
        with open(sw, "rb") as src, open(hdr, "wb") as dst:
            dst.write(src.read(4096))
        blocks = SWAP_MIB * 1024 * 1024 // 4096
        cmds = Path(td) / "cmds"
        cmds.write_text(
            f"write {hdr} swapfile\n"
            f"sif /swapfile size {SWAP_MIB * 1024 * 1024}\n"
            f"fallocate /swapfile 1 {blocks - 1}\n"
            "sif /swapfile mode 0100600\n")
        run_logged([tool("debugfs"), "-w", "-f", str(cmds), str(tmp)], blog, T_IMAGE, "debugfs (swapfile)")
    check = subprocess.run([tool("debugfs"), "-R", "stat /swapfile", str(tmp)], capture_output=True, text=True)
    if f"Size: {SWAP_MIB * 1024 * 1024}" not in check.stdout:
        raise Fail(f"swapfile not as expected in {tmp}: {check.stdout[:300]}")
    subprocess.run([tool("e2fsck"), "-fn", str(tmp)], check=True, capture_output=True)
    os.replace(tmp, img)


def prune_old(keep: Path) -> None:
    running = read_vm()
    for old in CACHE.glob("base-*"):
        if old == keep or not old.is_dir():
            continue
        if running and running.get("base") == old.name and vm_alive(running):
            log(f"keeping {old.name}: the running VM uses it")
            continue
        log(f"removing old image {old.name} ({human(du(old))})")
        safe_rmtree(old)


# --------------------------------------------------------------------------
# install: the current checkout onto a small data disk
# --------------------------------------------------------------------------
def checkout_files() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".venv-lint", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                "__pycache__", "build", "dist"}
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(root, n), REPO) for n in names]
    return sorted(f for f in files if os.path.lexists(REPO / f))


def copy_checkout(dst: Path, files: list[str]) -> None:
    for rel in files:
        src = REPO / rel
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        elif src.is_file():
            shutil.copy2(src, out)


def cmd_install(args) -> int:
    need_root()
    ensure_host_tools(["mkfs.ext4"])
    base = base_dir()
    if not (base / "READY").exists():
        raise Fail(f"no image for the current recipe ({base.name}): run `{HERE.name}/vm.py build` first")
    t0 = now()
    with flocked(CACHE / "build.lock", "build/install"):
        rootfs = base / "rootfs"
        work = rootfs / "tmp/bg-install"
        safe_rmtree(work)
        files = checkout_files()
        copy_checkout(work / "build-src", files)   # pip builds in it (egg-info, build/)
        stage = base / "data.stage"
        safe_rmtree(stage)
        copy_checkout(stage / "src", files)         # pristine copy for the guest
        ilog = base / "install.log"
        ilog.write_text("")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
        try:
            run_logged(["chroot", str(rootfs), f"{VENV}/bin/python", "-m", "pip", "install", "-q",
                        "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", "/tmp/bg-install/pkg", "/tmp/bg-install/build-src"],
                       ilog, T_INSTALL, "pip install (chroot)", env=env)
            shutil.move(str(work / "pkg"), str(stage / "pkg"))
        finally:
            safe_rmtree(work)
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip() or "?"
        info = {"installed": time.strftime("%Y-%m-%d %H:%M:%S"), "git": rev, "files": len(files),
                "base": base.name}
        (stage / "INSTALLED.json").write_text(json.dumps(info) + "\n")
        size_mib = max(DATA_MIN_MIB, 2 * du(stage) // (1024 * 1024) + 32)
        tmp = base / "data.img.tmp"
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb") as fh:
            fh.truncate(size_mib * 1024 * 1024)
        run_logged([tool("mkfs.ext4"), "-F", "-q", "-L", "bgdata", "-E", "root_owner=0:0",
                    "-d", str(stage), str(tmp)], ilog, T_IMAGE, "mkfs.ext4 (data)")
        os.replace(tmp, base / "data.img")   # a running VM keeps the old inode
        safe_rmtree(stage)
        (base / "INSTALLED.json").write_text(json.dumps(info) + "\n")
    log(f"installed {rev} ({len(files)} files) on the data disk in {now() - t0:.1f}s"
        + ("; the running VM sees it after its next boot" if vm_alive(read_vm()) else ""))
    return 0


# --------------------------------------------------------------------------
# the VM process
# --------------------------------------------------------------------------
VMFILE = STATE / "vm.json"


def read_vm() -> dict | None:
    try:
        return json.loads(VMFILE.read_text())
    except (OSError, ValueError):
        return None


def proc_start(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def vm_alive(rec: dict | None) -> bool:
    """Is the qemu recorded in rec still running (same pid and start time)?"""
    if not rec:
        return False
    st = proc_start(rec["pid"])
    if st is None or st[1] != rec["start"]:
        return False
    if st[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(rec["pid"], os.WNOHANG)   # our own child: reap it
        return False
    return True


def signal_vm(rec: dict, sig: int) -> None:
    """Signal exactly the recorded qemu: through a pidfd checked against the start time."""
    pid = rec["pid"]
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        if not vm_alive(rec):
            return
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    finally:
        if fd is not None:
            os.close(fd)


def wait_dead(rec: dict, timeout: float) -> bool:
    deadline = now() + timeout
    while vm_alive(rec):
        if now() > deadline:
            return False
        time.sleep(0.2)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_base(rec: dict, connect_timeout: int = 10, extra: tuple = ()) -> list[str]:
    key = key_path(CACHE / rec["base"])
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(rec["port"]),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=8",
            *extra, "root@127.0.0.1"]


def ssh_capture(rec: dict, command: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(ssh_base(rec, extra=("-n",)) + [command], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 124, "", f"timed out after {timeout:.0f}s")


def wait_banner(rec: dict, timeout: float) -> None:
    """qemu accepts the forwarded port at once: wait for sshd's own banner."""
    deadline = now() + timeout
    while True:
        if not vm_alive(rec):
            raise Fail(f"qemu exited during boot; see {STATE}/qemu.log and {STATE}/serial.log\n"
                       + tail_lines(STATE / "qemu.log", 5) + "\n" + tail_lines(STATE / "serial.log", 10))
        try:
            with socket.create_connection(("127.0.0.1", rec["port"]), timeout=3) as s:
                s.settimeout(5)
                data = s.recv(64)
                if data.startswith(b"SSH-2.0"):
                    return
        except OSError:
            pass
        if now() > deadline:
            raise Fail(f"no SSH banner within {timeout:.0f}s; serial log: {STATE}/serial.log\n"
                       + tail_lines(STATE / "serial.log", 10))
        time.sleep(1)


def cmd_up(args) -> int:
    need_root()
    ensure_host_tools(["qemu-system-x86_64", "qemu-img", "ssh"])
    with flocked(STATE / "vm.lock", "up/down"):
        rec = read_vm()
        if vm_alive(rec):
            log(f"already up (qemu pid {rec['pid']}, ssh port {rec['port']})")
            return 0
        return boot(args)


def boot(args) -> int:
    base = base_dir()
    if not (base / "READY").exists():
        raise Fail(f"no image for the current recipe ({base.name}): run `e2e/vm.py build` first")
    if not (base / "data.img").exists():
        raise Fail("nothing installed yet: run `e2e/vm.py install` first")
    STATE.mkdir(parents=True, exist_ok=True)
    for f in ("root.qcow2", "data.qcow2", "serial.log", "qemu.log"):
        (STATE / f).unlink(missing_ok=True)
    # throwaway overlays: every boot starts from the pristine image and install
    for name, backing in (("root.qcow2", base / "base.img"), ("data.qcow2", base / "data.img")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing),
                        str(STATE / name)], check=True, timeout=60)
    port = free_port()
    append = ("root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 net.ifnames=0 "
              "panic=5 systemd.show_status=auto")
    cmd = [
        "qemu-system-x86_64", "-name", HOSTNAME, "-nodefaults", "-no-user-config",
        "-display", "none", "-vga", "none", "-no-reboot",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(GUEST_CPUS), "-m", str(GUEST_MEM_MIB),
        "-kernel", str(base / "vmlinuz"), "-initrd", str(base / "initrd.img"), "-append", append,
        "-drive", f"file={STATE / 'root.qcow2'},if=virtio,format=qcow2,cache=unsafe",
        "-drive", f"file={STATE / 'data.qcow2'},if=virtio,format=qcow2,cache=unsafe",
        "-netdev", f"user,id=n0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
        "-serial", f"file:{STATE / 'serial.log'}", "-monitor", "none",
    ]
    t0 = now()
    with open(STATE / "qemu.log", "w") as out:
        out.write(shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    st = proc_start(proc.pid)
    rec = {"pid": proc.pid, "start": st[1] if st else 0, "port": port, "base": base.name,
           "booted": time.strftime("%Y-%m-%d %H:%M:%S")}
    VMFILE.write_text(json.dumps(rec) + "\n")
    log(f"qemu pid {proc.pid} started (ssh 127.0.0.1:{port}; serial log {STATE}/serial.log)")
    try:
        wait_banner(rec, args.boot_timeout)
        t_ssh = now() - t0
        log(f"  SSH banner after {t_ssh:.1f}s")
        r = ssh_capture(rec, "systemctl is-system-running --wait", args.ready_timeout)
        state = r.stdout.strip() or r.stderr.strip()
        t_ready = now() - t0
        if state not in ("running", "degraded"):
            raise Fail(f"guest not ready after {t_ready:.0f}s: systemctl is-system-running: {state!r}")
        if state == "degraded":
            failed = ssh_capture(rec, "systemctl --failed --no-legend --plain | cut -d' ' -f1 | xargs", 60)
            log(f"  warning: guest is degraded, failed units: {failed.stdout.strip()}")
        log(f"up: system {state} after {t_ready:.1f}s (SSH at {t_ssh:.1f}s)")
        rec.update(ssh_seconds=round(t_ssh, 1), ready_seconds=round(t_ready, 1))
        VMFILE.write_text(json.dumps(rec) + "\n")
        return 0
    except BaseException:
        if not getattr(args, "keep", False):
            log("boot failed: stopping qemu")
            shutdown(rec, graceful=False)
        raise


def shutdown(rec: dict, graceful: bool = True) -> float:
    t0 = now()
    if vm_alive(rec) and graceful:
        r = ssh_capture(rec, "systemctl poweroff --no-block", 20)
        if r.returncode not in (0, 255):
            log(f"  poweroff over ssh: exit {r.returncode} {r.stderr.strip()[:200]}")
        if not wait_dead(rec, T_POWEROFF):
            log(f"  no poweroff within {T_POWEROFF}s: terminating qemu")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not vm_alive(rec):
            break
        signal_vm(rec, sig)
        wait_dead(rec, T_KILL)
    if vm_alive(rec):
        raise Fail(f"qemu pid {rec['pid']} survived SIGKILL")
    VMFILE.unlink(missing_ok=True)
    for f in ("root.qcow2", "data.qcow2"):
        (STATE / f).unlink(missing_ok=True)
    return now() - t0


def cmd_down(args) -> int:
    with flocked(STATE / "vm.lock", "up/down"):
        rec = read_vm()
        if not vm_alive(rec):
            VMFILE.unlink(missing_ok=True)
            log("down: not running")
            return 0
        secs = shutdown(rec, graceful=not args.kill)
        log(f"down: qemu pid {rec['pid']} gone after {secs:.1f}s")
    return 0


# --------------------------------------------------------------------------
# ssh, run
# --------------------------------------------------------------------------
def remote_command(words: list[str], timeout: float) -> str:
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise Fail("no command given")
    # one word is a shell command line; several are an argv
    line = words[0] if len(words) == 1 else shlex.join(words)
    return f"timeout -k 10 {int(timeout)} bash -c {shlex.quote(line)}"


def ssh_stream(rec: dict, words: list[str], timeout: float, stdin: bool) -> int:
    cmd = ssh_base(rec, extra=() if stdin else ("-n",)) + [remote_command(words, timeout)]
    proc = subprocess.Popen(cmd, stdin=None if stdin else subprocess.DEVNULL)
    try:
        return proc.wait(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        log(f"ssh command exceeded {timeout:.0f}s: killed")
        proc.kill()
        proc.wait()
        return 124
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def cmd_ssh(args) -> int:
    rec = read_vm()
    if not vm_alive(rec):
        raise Fail("the VM is not up: `e2e/vm.py up` first")
    return ssh_stream(rec, args.command, args.timeout, args.stdin)


def cmd_run(args) -> int:
    need_root()
    ensure_host_tools(["qemu-system-x86_64", "qemu-img", "ssh"])

    def on_signal(signum, frame):
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    times = {}
    rc = 1
    rec = None
    booted = False
    try:
        t = now()
        with flocked(STATE / "vm.lock", "up/down"):
            if vm_alive(read_vm()):
                raise Fail("a VM is already up: use `e2e/vm.py ssh`, or `e2e/vm.py down` first")
            booted = True
            boot(args)
        rec = read_vm()
        times["boot"] = now() - t
        t = now()
        rc = ssh_stream(rec, args.command, args.timeout, args.stdin)
        times["command"] = now() - t
        log(f"command exited {rc} after {times['command']:.1f}s")
    except Interrupted as exc:
        log(f"interrupted by signal {exc.signum}: shutting the VM down")
        rc = 128 + exc.signum
    finally:
        # no signal may interrupt the teardown (it is bounded by itself)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, lambda s, f: log(f"signal {s} ignored during shutdown"))
        t = now()
        if booted:
            try:
                lock = flocked(STATE / "vm.lock", "up/down")
                lock.__enter__()
            except Fail as exc:   # shut our VM down all the same
                log(f"warning: {exc}")
                lock = None
            try:
                rec = read_vm()
                if vm_alive(rec):
                    shutdown(rec)
                VMFILE.unlink(missing_ok=True)
            finally:
                if lock is not None:
                    lock.__exit__(None, None, None)
        times["shutdown"] = now() - t
        if rec and "ready_seconds" in rec:
            times["ssh banner"] = rec["ssh_seconds"]
            times["system running"] = rec["ready_seconds"]
        log("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return rc


def cmd_sync(args) -> int:
    """The checkout into a running guest, without a reboot: the files as
    `install` picks them into the guest's checkout (/opt/buildgate-src), and the
    package's own files (src/buildgate/, pure Python) over the installed copy.
    For iterating; `install` + a boot is what CI does."""
    need_root()
    rec = read_vm()
    if not vm_alive(rec):
        raise Fail("the VM is not up: `e2e/vm.py up` first")
    t0 = now()
    files = checkout_files()
    with tempfile.TemporaryDirectory(prefix="bgvm-sync.") as tmp:
        copy_checkout(Path(tmp) / "src", files)
        tarball = Path(tmp) / "sync.tar"
        subprocess.run(["tar", "-C", str(Path(tmp) / "src"), "-cf", str(tarball), "."], check=True,
                       timeout=120)
        remote = (f"set -e; rm -rf {DATA_MNT}/src.new; mkdir {DATA_MNT}/src.new; "
                  f"tar -C {DATA_MNT}/src.new -xf -; rm -rf {DATA_MNT}/src; mv {DATA_MNT}/src.new {DATA_MNT}/src; "
                  f"cp -r {DATA_MNT}/src/src/buildgate/. {DATA_MNT}/pkg/buildgate/; "
                  f"find {DATA_MNT}/pkg/buildgate -name __pycache__ -prune -exec rm -rf {{}} +")
        with open(tarball, "rb") as fh:
            r = subprocess.run(ssh_base(rec) + [remote], stdin=fh, capture_output=True, text=True,
                               timeout=300)
    if r.returncode != 0:
        raise Fail(f"sync failed (exit {r.returncode}): {r.stderr.strip()[:300]}")
    log(f"synced {len(files)} files into the running VM in {now() - t0:.1f}s")
    return 0


def cmd_status(args) -> int:
    h = recipe_hash()
    base = base_dir(h)
    print(f"recipe:    {h}")
    print(f"cache:     {CACHE} ({human(du(CACHE)) if CACHE.exists() else 'empty'})")
    if (base / "READY").exists():
        print(f"image:     {base} built {json.loads((base / 'READY').read_text())['built']}")
    else:
        print("image:     not built for this recipe (`e2e/vm.py build`)")
    inst = base / "INSTALLED.json"
    print(f"installed: {json.loads(inst.read_text()) if inst.exists() else 'nothing (`e2e/vm.py install`)'}")
    rec = read_vm()
    if vm_alive(rec):
        print(f"vm:        up, qemu pid {rec['pid']}, ssh 127.0.0.1:{rec['port']}, booted {rec['booted']}")
    else:
        print("vm:        down")
    print(f"state:     {STATE} (vm.log, serial.log, qemu.log)")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="e2e/vm.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest image (cached by recipe hash)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    sub.add_parser("install", help="put the current checkout on the guest's data disk")
    sub.add_parser("status", help="what is built, installed, running")
    sub.add_parser("sync", help="copy the checkout into the running VM (no reboot; for iterating)")
    d = sub.add_parser("down", help="shut the VM down (idempotent)")
    d.add_argument("--kill", action="store_true", help="no poweroff: terminate qemu at once")
    helps = {"up": "boot the VM", "run": "up + ssh CMD + down",
             "smoke": "up + e2e/smoke.sh in the guest + down",
             "pytest": "up + pytest ARGS on the installed checkout in the guest + down"}
    for name in ("up", "run", "smoke", "pytest"):
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("--boot-timeout", type=float, default=T_BANNER, help="seconds to the SSH banner")
        p.add_argument("--ready-timeout", type=float, default=T_READY,
                       help="seconds for `systemctl is-system-running --wait`")
        if name == "up":
            p.add_argument("--keep", action="store_true", help="keep qemu running if the boot fails")
    for name in ("ssh", "run", "smoke", "pytest"):
        p = sub.choices[name] if name in sub.choices else sub.add_parser(name, help="run CMD in the guest")
        p.add_argument("-t", "--timeout", type=float, default=T_SSH_DEFAULT,
                       help=f"bound for the command, seconds (default {T_SSH_DEFAULT})")
        p.add_argument("--stdin", action="store_true", help="forward stdin to the command")
        if name in ("ssh", "run"):
            p.add_argument("command", nargs=argparse.REMAINDER,
                           help="one word: a shell command line; several: an argv")
        elif name == "pytest":
            p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    args = ap.parse_args(argv)

    def on_signal(signum, frame):
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if args.cmd == "smoke":
        args.command = ["bash", f"{SRC_LINK}/e2e/smoke.sh"]
    elif args.cmd == "pytest":
        rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
        args.command = ["bash", f"{SRC_LINK}/e2e/guest-pytest.sh", *rest]
    handlers = {"build": cmd_build, "install": cmd_install, "up": cmd_up, "down": cmd_down,
                "ssh": cmd_ssh, "run": cmd_run, "status": cmd_status, "sync": cmd_sync,
                "smoke": cmd_run, "pytest": cmd_run}
    try:
        return handlers[args.cmd](args)
    except Fail as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Interrupted as exc:
        log(f"stopped by signal {exc.signum}")
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
