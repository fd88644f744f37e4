# shellcheck shell=bash
# Functions shared by the sbatch scripts of launch/slurm/. Sourced by them; srun runs one node's share
# of a multi-node job as `bash common.sh dit_node_task ENDPOINT NNODES PROGRAM ARGS...`.
#
# Environment read here (all optional):
#   PYTHON       interpreter of the project's environment (default: python, else python3)
#   TORCHRUN     launcher command (words); default: $PYTHON -m launch.torchrun, torchrun passing the workers'
#                exit code back (plain torchrun exits 1 whenever a worker fails) and SIGUSR1 on to them
#   NPROC        processes per node; default: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, nvidia-smi -L, 1
#   DIT_PROGRAM  what torchrun starts (words; default: the sampler, <checkout>/sample_ddp.py)
#   MASTER_PORT  rendezvous port of a multi-node job (default: derived from the job id, probed free)

DIT_EXIT_BAD_INPUT=2  # sample_ddp.py / evaluator: a bad flag or file; a rerun cannot help
DIT_EXIT_PREEMPTED=3  # sample_ddp.py stopped on SIGUSR1 after writing its in-flight PNGs
DIT_EXIT_FAILED=1     # a rank failed
DIT_SIGNAL_EXIT_BASE=128  # exit codes above: killed by signal (code - 128)
DIT_PORT_BASE=15000   # rendezvous ports: DIT_PORT_BASE + job id % DIT_PORT_SPAN, below the ephemeral range
DIT_PORT_SPAN=15000
DIT_PORT_TRIES=32     # ports probed upwards from there

dit_log() {
  printf '[%s %s] %s\n' "$(date '+%F %T')" "${HOSTNAME:-node}" "$*" >&2
}

dit_die() {  # CODE MESSAGE
  dit_log "error: $2"
  exit "$1"
}

# PYTHON, DIT_LAUNCHER (array), PYTHONPATH; ROOT must be set (the checkout).
dit_setup() {
  if [[ -z "${PYTHON:-}" ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
  fi
  command -v "$PYTHON" >/dev/null 2>&1 || dit_die "$DIT_EXIT_BAD_INPUT" "PYTHON=$PYTHON not found; activate the project's environment or set PYTHON"
  export PYTHON
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a DIT_LAUNCHER <<<"$TORCHRUN"
  else
    DIT_LAUNCHER=("$PYTHON" -m launch.torchrun)  # torchrun with the workers' exit code; passes SIGUSR1 on
  fi
}

# The program torchrun starts, into DIT_PROGRAM_WORDS: $DIT_PROGRAM (words) or the given default.
# shellcheck disable=SC2034  # DIT_PROGRAM_WORDS is read by the sbatch scripts
dit_program() {  # DEFAULT_WORDS...
  if [[ -n "${DIT_PROGRAM:-}" ]]; then
    read -r -a DIT_PROGRAM_WORDS <<<"$DIT_PROGRAM"
  else
    DIT_PROGRAM_WORDS=("$@")
  fi
}

# Processes to start on this node (one per GPU).
dit_gpu_count() {
  local n=""
  if [[ -n "${NPROC:-}" ]]; then
    n=$NPROC
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    n=$SLURM_GPUS_ON_NODE
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local -a ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    n=${#ids[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || n=""
  fi
  [[ -n "$n" && "$n" != 0 ]] || n=1  # no GPU: one CPU process (set NPROC for more)
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || dit_die "$DIT_EXIT_BAD_INPUT" "cannot use $n as the number of processes per node (set NPROC)"
  printf '%s\n' "$n"
}

# Send SIG to the children of PID (torchrun's workers), not to PID itself: torchrun has no handler for
# SIGUSR1, so its default action would kill it and orphan the workers.
dit_signal_children() {  # SIG PID
  local sig=$1 parent=$2 kids
  kids=$(pgrep -P "$parent" 2>/dev/null || ps -o pid= --ppid "$parent" 2>/dev/null) || kids=""
  if [[ -z "${kids//[[:space:]]/}" ]]; then
    dit_log "no worker process under PID $parent yet; SIG$sig not forwarded"
    return 0
  fi
  # shellcheck disable=SC2086  # one PID per word
  kill -s "$sig" $kids 2>/dev/null || true
}

_dit_on_usr1() {  # TARGET: children | self
  DIT_WOKEN=1
  DIT_SIGNALLED=1
  dit_log "SIGUSR1 (preemption warning): the workers finish the current batch and their PNG writes, then stop"
  if [[ "$1" == self ]]; then
    kill -s USR1 "$DIT_CHILD" 2>/dev/null || true  # srun forwards it to every task
  else
    dit_signal_children USR1 "$DIT_CHILD"
  fi
}

# Run CMD in the background and wait for it, so that this shell can act on SIGUSR1 meanwhile (bash runs
# a trap only between commands; `wait` is interrupted by it). On SIGUSR1 the signal goes to CMD's
# children (TARGET=children: torchrun's workers) or to CMD (TARGET=self: srun). Returns CMD's exit
# status; DIT_SIGNALLED=1 afterwards when a signal came.
dit_supervise() {  # TARGET CMD...
  local target=$1 rc
  shift
  DIT_SIGNALLED=0
  local -a shown=()
  local word
  for word in "$@"; do
    shown+=("$(printf '%q' "$word")")
  done
  dit_log "running: ${shown[*]}"
  "$@" &
  DIT_CHILD=$!
  # shellcheck disable=SC2064  # expand the target now
  trap "_dit_on_usr1 $target" USR1
  while :; do
    DIT_WOKEN=0
    wait "$DIT_CHILD"
    rc=$?
    [[ "$DIT_WOKEN" == 1 ]] || break  # woken by the trap: the child is still running (or its status is kept)
  done
  trap - USR1
  return "$rc"
}

# Requeue this job (same id; the rerun of the same command resumes where this one stopped).
dit_requeue() {
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    dit_log "stopped before the end and not under SLURM: rerun the same command to resume"
    return 0
  fi
  dit_log "requeueing job $SLURM_JOB_ID; the requeued run resumes from the PNGs on disk"
  scontrol requeue "$SLURM_JOB_ID" || dit_log "scontrol requeue $SLURM_JOB_ID failed; submit the same command again to resume"
}

# End the batch script with the sampler's exit code, requeueing first when it was preempted: exit code 3,
# or a preemption warning followed by any failure but bad input (a worker hit by the signal before it
# could catch it, or a TORCHRUN that does not pass exit codes on).
dit_finish() {  # RC
  local rc=$1
  if (( rc == DIT_EXIT_PREEMPTED )) || { (( DIT_SIGNALLED )) && (( rc != 0 && rc != DIT_EXIT_BAD_INPUT )); }; then
    dit_requeue
    exit "$DIT_EXIT_PREEMPTED"
  fi
  dit_log "finished with exit code $rc"
  exit "$rc"
}

# First host of the allocation: the c10d rendezvous runs there.
dit_first_host() {
  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")
  [[ ${#hosts[@]} -gt 0 && -n "${hosts[0]}" ]] || dit_die 1 "scontrol show hostnames $SLURM_JOB_NODELIST gave no host"
  printf '%s\n' "${hosts[0]}"
}

# A TCP port free on this host (the batch script runs on the job's first node): MASTER_PORT when set,
# else the first free one from DIT_PORT_BASE + job id % DIT_PORT_SPAN (different jobs, different ports).
dit_rdzv_port() {
  if [[ -n "${MASTER_PORT:-}" ]]; then
    printf '%s\n' "$MASTER_PORT"
    return 0
  fi
  local start=$(( DIT_PORT_BASE + ${SLURM_JOB_ID:-$$} % DIT_PORT_SPAN ))
  "$PYTHON" - "$start" "$DIT_PORT_TRIES" <<'EOF' || dit_die 1 "no free port in $start..+$DIT_PORT_TRIES; set MASTER_PORT"
import socket
import sys

start, tries = int(sys.argv[1]), int(sys.argv[2])
for port in range(start, start + tries):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    print(port)
    sys.exit(0)
sys.exit(1)
EOF
}

# One node's share of a multi-node job: torchrun with one process per local GPU joining the c10d
# rendezvous; SIGUSR1 (forwarded by srun) goes on to the workers. Exits with torchrun's exit code.
#
# srun exits with the highest exit code of its tasks, a task killed by a signal counting as 128 + N; and when
# one node's task fails, srun (--kill-on-bad-exit) sends SIGTERM to every process of the other nodes. So this
# task outlives SIGTERM (torchrun and its workers get it from srun themselves), waits for torchrun, and reports
# a torchrun stopped by a signal as DIT_EXIT_FAILED: srun's exit code is then the failed node's own (1 failed,
# 2 bad input, 3 preempted), not 143.
dit_node_task() {  # ENDPOINT NNODES PROGRAM... ARGS...
  local endpoint=$1 nnodes=$2 nproc rc
  shift 2
  dit_setup
  nproc=$(dit_gpu_count) || exit "$DIT_EXIT_BAD_INPUT"
  trap 'DIT_WOKEN=1; dit_log "SIGTERM: the step is ending (another node stopped, failed or the job was cancelled); waiting for torchrun"' TERM
  dit_supervise children "${DIT_LAUNCHER[@]}" --nnodes="$nnodes" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="${SLURM_JOB_ID:-dit}" "$@"
  rc=$?
  (( rc < DIT_SIGNAL_EXIT_BASE )) || rc=$DIT_EXIT_FAILED
  exit "$rc"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # executed (by srun), not sourced
  set -uo pipefail
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  case "${1:-}" in
    dit_node_task) shift; dit_node_task "$@" ;;
    *) dit_die "$DIT_EXIT_BAD_INPUT" "usage: bash common.sh dit_node_task ENDPOINT NNODES PROGRAM [ARGS...]" ;;
  esac
fi
