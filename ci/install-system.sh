#!/usr/bin/env bash
# System packages the tests need: SLURM, munge, numactl (cluster jobs, docs/cluster-jobs.md) and chromium
# (the HTML report opened in a real headless browser, docs/reports.md).
#
# Run as root (CI: called from .ci/run): `bash ci/install-system.sh`. Idempotent and quick: when every
# binary is already on PATH it does nothing; otherwise one `apt-get install` (~10 s). Tests never install.
set -euo pipefail

need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge numactl:numactl chromium:chromium; do
  bin=${pair%%:*}
  pkg=${pair##*:}
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
    need+=("$pkg")
  fi
done

if [ ${#need[@]} -eq 0 ]; then
  echo "install-system: slurm, munge, numactl and chromium already present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-system: need root to apt-get install ${need[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Only refresh the package lists when apt has none (a fresh container); otherwise install straight away.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
  apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends "${need[@]}" || {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
}
echo "install-system: installed ${need[*]}"
