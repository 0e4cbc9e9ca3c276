#!/usr/bin/env bash
# vdiff on a Cloud TPU VM pod slice: the same `vdiff train` on every worker at once.
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE             # once: install vdiff on every worker
#   launch/tpu_vm.sh train TPU_NAME ZONE --workdir /mnt/shared/run1 --config configs/dit_l.py
#
# The checkout must sit at REPO_DIR (default ~/vdiff) on every worker (git clone it on
# each, or put it on a shared disk). --workdir must be shared storage visible to every
# worker (Filestore/NFS, or a GCS FUSE mount): each worker writes its checkpoint shards
# there. VDIFF_DISTRIBUTED=auto makes vdiff call jax.distributed.initialize(), which
# finds the pod's workers itself. Host maintenance/preemption sends SIGTERM: every
# worker stops at the same step, saves, exits; rerun `train` to resume.
# Extra gcloud flags (e.g. --project P) go in GCLOUD_FLAGS.
set -euo pipefail

usage() { echo "usage: $0 {setup|train} TPU_NAME ZONE [vdiff train args...]" >&2; exit 2; }
[ $# -ge 3 ] || usage
action=$1 tpu=$2 zone=$3
shift 3
REPO_DIR=${REPO_DIR:-'~/vdiff'}

case "$action" in
  setup)
    remote="cd $REPO_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[tpu]'"
    ;;
  train)
    args=$(printf '%q ' "$@")
    remote="cd $REPO_DIR && . .venv/bin/activate && VDIFF_DISTRIBUTED=auto vdiff train $args"
    ;;
  *) usage ;;
esac

# shellcheck disable=SC2086
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${GCLOUD_FLAGS:-} \
  --worker=all --command="$remote"
