#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a pod slice), install this project and mount a bucket
# on every worker, train on all workers at once, watch, stop, delete. See docs/multihost.md.
set -euo pipefail

TPU_NAME=${TPU_NAME:-llm-tpu}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REPO_URL=${REPO_URL:-}
BRANCH=${BRANCH:-main}
WORKDIR=${WORKDIR:-}
BUCKET=${BUCKET:-}
MOUNT_POINT=${MOUNT_POINT:-}
CONFIG=${CONFIG:-configs/gpt_small.py}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
WORKER=${WORKER:-0}

usage() {
  cat <<EOF
usage: scripts/tpu_vm.sh COMMAND [extra gcloud flags]

commands:
  create   gcloud compute tpus tpu-vm create (extra flags pass through, e.g. --spot)
  setup    on every worker: clone or update REPO_URL at BRANCH into ~/llm, and install
           jax[tpu] plus requirements.txt into ~/venv (Python PYTHON_VERSION, via uv)
  mount    on every worker: install gcsfuse if missing, and mount gs://BUCKET at
           MOUNT_POINT (skipped where already mounted); run again after a reboot
  train    on every worker at once, in the background (nohup), appending to ~/train.log:
             python main.py --config=CONFIG --workdir=WORKDIR EXTRA_FLAGS
  logs     follow ~/train.log on worker WORKER (default 0: process 0); Ctrl-C stops following
  stop     send SIGTERM to the run on every worker: it saves a checkpoint and exits
  ssh      open a shell on worker WORKER
  delete   gcloud compute tpus tpu-vm delete

environment (current value):
  TPU_NAME=$TPU_NAME  ZONE=$ZONE
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE (v4-8: 4 chips on 1 host; v4-32: 16 chips on 4 hosts)
  RUNTIME_VERSION=$RUNTIME_VERSION (v4; v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
  REPO_URL=$REPO_URL (required by setup; the workers must be able to clone it)
  BRANCH=$BRANCH  CONFIG=$CONFIG  PYTHON_VERSION=$PYTHON_VERSION  WORKER=$WORKER
  BUCKET=$BUCKET (required by mount, e.g. my-bucket)  MOUNT_POINT=${MOUNT_POINT:-/mnt/BUCKET}
  WORKDIR=$WORKDIR (required by train; all workers reach it: /mnt/my-bucket/runs/gpt_small, not gs://)
  EXTRA_FLAGS=$EXTRA_FLAGS (split on spaces, e.g. "--config.mesh.data=1 --config.mesh.fsdp=-1")
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 1; }
require() { [[ -n ${!1} ]] || die "$1 is not set: $2"; }

# on_workers WORKERS COMMAND [gcloud flags]: runs COMMAND in the home directory of the
# given workers ('all' or an index); with 'all' gcloud runs them in parallel.
on_workers() {
  local workers=$1 command=$2
  shift 2
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$workers" \
    --command="$command" "$@"
}

setup_command() {
  local repo branch
  repo=$(printf '%q' "$REPO_URL")
  branch=$(printf '%q' "$BRANCH")
  cat <<EOF
set -e
if [ -d llm/.git ]; then
  git -C llm fetch --quiet origin $branch && git -C llm checkout --quiet --force -B $branch FETCH_HEAD
else
  git clone --quiet --branch $branch $repo llm
fi
python3 -m pip install --quiet --user --upgrade uv
[ -x venv/bin/python ] || ~/.local/bin/uv venv --quiet --python $(printf '%q' "$PYTHON_VERSION") venv
VIRTUAL_ENV=\$HOME/venv ~/.local/bin/uv pip install --quiet --upgrade 'jax[tpu]' -r llm/requirements.txt
echo "\$(hostname): llm at \$(git -C llm rev-parse --short HEAD), \$(venv/bin/python -c 'import jax; print("jax", jax.__version__)')"
EOF
}

# gcsfuse runs as the ssh user, the run's user. --rename-dir-limit: Orbax renames checkpoint
# directories, refused by default without hierarchical namespace. TTL 0: all workers write.
mount_command() {
  local b m
  b=$(printf '%q' "$BUCKET") m=$(printf '%q' "$MOUNT_POINT")
  cat <<EOF
set -e
if ! command -v gcsfuse > /dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
  sudo apt-get -qq -o DPkg::Lock::Timeout=300 update
  sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300 install -y gcsfuse > /dev/null
fi
if mountpoint -q $m; then echo "\$(hostname): $m is already mounted"; else
  sudo mkdir -p $m && sudo chown "\$(id -u):\$(id -g)" $m
  gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 $b $m
  echo "\$(hostname): mounted gs://$b at $m"
fi
EOF
}

# The token cache is a memory-mapped local file: keep it on each worker's disk.
train_command() {
  cat <<EOF
set -e
if [ -f train.pid ] && kill -0 "\$(cat train.pid)" 2>/dev/null; then
  echo "\$(hostname): a run is still going (pid \$(cat train.pid)); use 'stop' first" >&2; exit 1
fi
cd llm
nohup ~/venv/bin/python main.py --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR") \\
  --config.data.cache_dir=\$HOME/data_cache $EXTRA_FLAGS >> ~/train.log 2>&1 < /dev/null &
echo \$! > ~/train.pid
echo "\$(hostname): started pid \$!, log ~/train.log at commit \$(git rev-parse --short HEAD)"
EOF
}

# shellcheck disable=SC2016  # expanded on the workers, not here
stop_command='if [ -f train.pid ] && kill -TERM "$(cat train.pid)" 2>/dev/null; then
  echo "$(hostname): sent SIGTERM to pid $(cat train.pid)"; else echo "$(hostname): no run"; fi'

command=${1:-help}
shift $(($# > 0))
case $command in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@" ;;
  setup)
    require REPO_URL "the project's git URL, e.g. REPO_URL=https://github.com/ORG/REPO.git"
    on_workers all "$(setup_command)" "$@" ;;
  mount)
    require BUCKET "the Cloud Storage bucket to mount, e.g. BUCKET=my-bucket"
    BUCKET=${BUCKET#gs://} && BUCKET=${BUCKET%%/*} && MOUNT_POINT=${MOUNT_POINT:-/mnt/$BUCKET}
    on_workers all "$(mount_command)" "$@" ;;
  train)
    require WORKDIR "a directory every worker reaches, e.g. WORKDIR=/mnt/my-bucket/runs/gpt_small"
    [[ $WORKDIR != gs://* ]] || die "gs:// workdirs are not supported yet: mount the bucket on every" \
      "worker (BUCKET=<bucket> scripts/tpu_vm.sh mount) and set WORKDIR=/mnt/${WORKDIR#gs://}"
    on_workers all "$(train_command)" "$@" ;;
  logs) on_workers "$WORKER" 'tail -n 100 -F ~/train.log' "$@" ;;
  stop) on_workers all "$stop_command" "$@" ;;
  ssh) gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$WORKER" "$@" ;;
  delete) gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "$@" ;;
  help | -h | --help) usage ;;
  *) usage >&2; die "unknown command '$command'" ;;
esac
