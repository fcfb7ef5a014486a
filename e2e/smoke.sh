#!/bin/bash
# Smoke check, run INSIDE the e2e guest (the checkout is at /opt/buildgate-src):
#   e2e/vm.py run -- 'bash /opt/buildgate-src/e2e/smoke.sh'
# Exits non-zero when any check fails.
set -u
fail=0
check() {  # check NAME COMMAND...: run COMMAND, report ok/FAIL
    local name=$1; shift
    if "$@"; then echo "ok    $name"; else echo "FAIL  $name"; fail=1; fi
}

fs=$(stat -fc %T /sys/fs/cgroup)
echo "cgroup fs:   $fs ($(cat /sys/fs/cgroup/cgroup.controllers))"
echo "systemd:     $(systemctl --version | head -1)"
echo "kernel:      $(uname -r), $(nproc) cpus, $(free -m | awk '/^Mem/{print $2}') MiB"
echo "buildgate:   $(buildgate --version 2>&1) ($(command -v buildgate))"
echo "this shell:  $(cat /proc/self/cgroup)"
check "cgroup v2 mounted"                 test "$fs" = cgroup2fs
check "memory controller"                 grep -qw memory /sys/fs/cgroup/cgroup.controllers
check "systemd is PID 1"                  test "$(cat /proc/1/comm)" = systemd
check "system running"                    test "$(systemctl is-system-running)" = running
check "ssh session in its own scope"      grep -q '/session-.*\.scope$' /proc/self/cgroup
check "buildgate --version"               buildgate --version
check "hostname bgvm"                     test "$(hostname)" = bgvm

# A 100M scope allocating 300M is OOM-killed by its own cap
# (in a slice of its own that outlives the failed scope: its memory.events counts the kill)
slice=bgvmsmoke.slice   # no dash: a dash would nest it in bgvm.slice
mkdir -p /run/systemd/system
printf "[Unit]\nDescription=vm.py smoke\n[Slice]\nMemoryAccounting=yes\n" > /run/systemd/system/$slice
systemctl daemon-reload && systemctl start $slice
systemd-run --quiet --scope --unit=bgvm-smoke-oom --slice=$slice -p MemoryMax=100M -p MemorySwapMax=0 \
    python3 -c 'b = bytearray(300 * 1024 * 1024)'
rc=$?
oom_kill=$(awk '$1 == "oom_kill" {print $2}' /sys/fs/cgroup/$slice/memory.events 2>/dev/null)
echo "oom scope:   exit $rc, $slice memory.events oom_kill=${oom_kill:-?}"
check "capped scope fails (exit != 0)"    test "$rc" -ne 0
check "memory.events oom_kill >= 1"       test "${oom_kill:-0}" -ge 1
systemctl reset-failed bgvm-smoke-oom.scope 2>/dev/null
systemctl stop $slice 2>/dev/null
rm -f /run/systemd/system/$slice && systemctl daemon-reload

# Swap: a 1 GiB /swapfile, off until a test turns it on
check "swap off by default"               test -z "$(swapon --noheadings --show)"
check "swapon /swapfile"                  swapon /swapfile
echo "swap:        $(swapon --noheadings --show --bytes | awk '{print $1, $3}')"
check "swapoff /swapfile"                 swapoff /swapfile

[ "$fail" = 0 ] && echo "smoke: all ok" || echo "smoke: FAILED"
exit "$fail"
