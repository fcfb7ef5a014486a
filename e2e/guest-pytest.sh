#!/bin/bash
# pytest on the installed checkout, run INSIDE the e2e guest (systemd is PID 1
# there, so no tests/run sandbox):
#   e2e/vm.py run -- 'bash /opt/buildgate-src/e2e/guest-pytest.sh tests/integration -q'
# or simply:  e2e/vm.py pytest tests/integration -q
# BUILDGATE_TEST_CGROUP=2: the guest must be cgroup v2 (else a usage error,
# exit 4), and the tests marked cgroup2 run instead of being deselected.
# BUILDGATE_TEST_THROWAWAY=1: the guest is thrown away after the run, so the
# tests that change the host (setup's /etc files, build.slice, swap) may.
cd /opt/buildgate-src || exit 1
exec env BUILDGATE_TEST_SYSTEMD=host BUILDGATE_TEST_CGROUP=2 BUILDGATE_TEST_THROWAWAY=1 \
    BUILDGATE_TEST_BACKENDS="${BUILDGATE_TEST_BACKENDS:-systemd,cgroupfs}" \
    /opt/buildgate-venv/bin/python -m pytest -p no:cacheprovider "$@"
