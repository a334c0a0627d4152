#!/usr/bin/env bash
# Submit the study's heavy stages to Slurm as array jobs that run the same stage scripts, with the
# same arguments, as dvc.yaml, and write the same files. Run from the project root:
#
#     scripts/slurm/submit.sh extract        # one stage (and its join + verify jobs)
#     scripts/slurm/submit.sh all            # every heavy stage, chained with afterok dependencies
#
# Prints the id of the job that finishes the submission, so calls can be chained (AFTER=<id>).
# Knobs (environment):
#   MODELS, SPACES  which models / reference spaces (default: params.yaml)
#   WORKERS      processes per model for extract, captions and perturb (default 4); their parts are
#                joined by one plain stage run per model, then checked by stages/verify.py
#   SBATCH_ARGS  extra sbatch options for every job, e.g. "--partition=gpu --gres=gpu:a100:1"
#   AFTER        a job id the first job waits for (afterok)
#   RECON_GPUS   GPUs per reconstructor training (default 1); more runs stages/recon.py under torchrun
#                (DistributedDataParallel, each rank streaming its share of every batch)
# Then record the results with DVC: see scripts/slurm/README.md.
set -euo pipefail
HERE=$(dirname "$0")
test -f params.yaml || { echo "submit.sh: run from the project root (no params.yaml here)" >&2; exit 2; }

param() { python -c "import yaml; p = yaml.safe_load(open('params.yaml')); print(*($1))"; }
MODELS=${MODELS:-$(param 'p["models"]')}
SPACES=${SPACES:-$(param 'p["references"]["spaces"]')}
WORKERS=${WORKERS:-4}
SBATCH_ARGS=${SBATCH_ARGS:-}
CPU="--gres=none"   # stages that never touch a model: geometry, recon_eval, the joins
LOGS=logs/slurm
mkdir -p "$LOGS"    # Slurm does not create the --output folder

# array NAME AFTER [sbatch options]: submit the task lines read from stdin as one array job waiting
# for job(s) AFTER (colon-separated, may be empty); prints its id.
array() {
  local name=$1 after=$2 list="$LOGS/$1.tasks" n
  shift 2
  cat > "$list"
  n=$(wc -l < "$list")
  # SBATCH_ARGS come after our per-stage options, so the user's choice wins
  sbatch --parsable --job-name="conngeo-$name" --array="0-$((n - 1))" ${after:+--dependency=afterok:$after} \
    "$@" $SBATCH_ARGS "$HERE/task.sbatch" "$list" | cut -d';' -f1
}

# verify WHAT MODEL: the check after a stage, deaf to the wall's SIGTERM (task.sbatch): it is short, and
# stopping it would rerun the finished stage
verify() { echo "(trap '' TERM; python stages/verify.py $1 --model $2)"; }

# sharded: WORKERS tasks per model, then per model the plain command (joins the parts) and verify;
# with WORKERS=1 the plain command does the work itself (a worker of one would join, and the join redo it)
sharded() {  # STAGE VERIFY AFTER
  local stage=$1 check=$2 after=$3 id m i
  if [ "$WORKERS" -eq 1 ]; then
    for m in $MODELS; do echo "python stages/$stage.py --model $m && $(verify "$check" "$m")"; done |
      array "$stage" "$after"
    return
  fi
  id=$(for m in $MODELS; do for ((i = 0; i < WORKERS; i++)); do
         echo "python stages/$stage.py --model $m --worker $i --workers $WORKERS"; done; done |
       array "$stage" "$after")
  for m in $MODELS; do echo "python stages/$stage.py --model $m && $(verify "$check" "$m")"; done |
    array "$stage-join" "$id" $CPU
}
per_model() {  # STAGE AFTER [sbatch options]
  local stage=$1 after=$2 m
  shift 2
  for m in $MODELS; do echo "python stages/$stage.py --model $m"; done | array "$stage" "$after" "$@"
}

extract()      { sharded extract vectors "$1"; }
captions()     { sharded captions captions "$1"; }
references()   { local s; for s in $SPACES; do echo "python stages/references.py --space $s"; done |
                   array references "$1"; }
geometry()     { per_model geometry "$1" $CPU; }
recon() {  # RECON_GPUS > 1: data parallel on that many GPUs of one node (torchrun; the same result, faster)
  local m   # torchrun kills its ranks 30 s after a SIGTERM by default: let them finish their epoch (the wall bounds it)
  if [ "${RECON_GPUS:-1}" -gt 1 ]; then
    for m in $MODELS; do echo "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=3600 torchrun --standalone --nproc-per-node $RECON_GPUS" \
      "stages/recon.py --model $m"; done |
      array recon "$1" --gres="gpu:$RECON_GPUS"
  else
    per_model recon "$1"
  fi
}
recon_export() { per_model recon_export "$1"; }
recon_eval()   { per_model recon_eval "$1" $CPU; }
score()        { per_model score "$1"; }
perturb()      { sharded perturb perturb "$1"; }  # every worker: its windows of images at every mode and level
all() {  # the DAG of dvc.yaml from extraction on (toyworld, pretrain and zoo are light: dvc repro them first)
  local ex rf ge rc re ev ca pe
  ex=$(extract "$1"); rf=$(references "$1")
  ge=$(geometry "$ex:$rf"); rc=$(recon "$ex"); re=$(recon_export "$rc"); ev=$(recon_eval "$re")
  ca=$(captions "$re"); pe=$(perturb "$ex")
  score "$ca:$pe:$ge:$ev"   # the last job waits for everything (geometry and recon_eval only so that it ends last)
}

stage=${1:?usage: scripts/slurm/submit.sh extract|references|geometry|recon|recon_export|recon_eval|captions|perturb|score|all}
case $stage in
  extract|references|geometry|recon|recon_export|recon_eval|captions|perturb|score|all) $stage "${AFTER:-}" ;;
  *) echo "submit.sh: unknown stage $stage" >&2; exit 2 ;;
esac
