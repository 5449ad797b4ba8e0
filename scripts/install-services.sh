#!/usr/bin/env bash
# Install the Debian packages the Slurm test fixture needs (tests/services/slurm.py):
# slurmctld, slurmd, slurm-client and munge; and curl, which webdataset's gopen runs for http(s)
# data paths (tests/pretrain/test_remote_data.py). Idempotent: does nothing when they are
# already installed. Must run as root.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge curl)

die() {
    echo "install-services: $*" >&2
    exit 1
}

have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

if have slurmctld && have slurmd && have sinfo && have munged && have curl; then
    echo "install-services: slurm, munge and curl already installed"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (uid $(id -u)); try: sudo $0"
have apt-get || die "apt-get not found; install ${PACKAGES[*]} with this platform's package manager"

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp /tmp/install-services.XXXXXX.log)"
trap 'rm -f "$log"' EXIT

apt_install() {
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1
}

# Only refresh the package lists when they are missing or the packages are unknown.
if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
    echo "install-services: apt-get update"
    apt-get update -qq >"$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get update failed"; }
fi

echo "install-services: installing ${PACKAGES[*]}"
if ! apt_install; then
    # Stale package lists give 404s on install; refresh once and retry.
    apt-get update -qq >"$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get update failed"; }
    apt_install || { tail -n 20 "$log" >&2; die "apt-get install ${PACKAGES[*]} failed"; }
fi

for cmd in slurmctld slurmd sinfo sbatch scontrol munged; do
    have "$cmd" || die "$cmd still missing after installing ${PACKAGES[*]}"
done
echo "install-services: installed $(slurmctld -V 2>/dev/null || echo slurm) and munge"
