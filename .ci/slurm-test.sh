#!/usr/bin/env bash
# A sweep as a Slurm array job on a real single-node cluster (slurmctld + slurmd + munged on this machine, started here
# and stopped on exit, even on failure): submits a 4-task sweep of tiny coders (stage 1 cache job, stage 2 array, stage 3
# gather, chained by submit.sh), stops one task mid-run with `scancel --signal=TERM` (it checkpoints, exits 75 and
# requeues itself, then resumes from the checkpoint), reruns one finished task (skipped), and checks that the gathered
# sweep.csv and frontier.csv equal the in-process `transcoders sweep` of the same settings, byte for byte.
# Needs Debian's slurm-wlm and munge (installed with apt when missing and run as root). Run after a Release build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v slurmctld >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    else
        echo "slurm test: slurm-wlm is not installed and cannot be installed here (not root)" >&2; exit 1
    fi
fi

work="$(mktemp -d -t transcoders-slurm-XXXXXX)"
S="$work/slurm"; mkdir -p "$S/state" "$S/spool" "$S/log"
host="$(hostname -s)"
stop_cluster() {
    for p in "$S/slurmd.pid" "$S/slurmctld.pid" "$S/munged.pid"; do
        if [ -f "$p" ]; then kill "$(cat "$p")" 2>/dev/null || true; fi
    done
    sleep 1
    if [ "${KEEP_SLURM_WORK:-}" = "" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap stop_cluster EXIT

# munge: a fresh key and its own socket, so that a munged already running here is left alone.
dd if=/dev/urandom of="$S/munge.key" bs=1024 count=1 status=none
chmod 400 "$S/munge.key"
munged --force --key-file="$S/munge.key" --socket="$S/munge.sock" --pid-file="$S/munged.pid" \
       --log-file="$S/log/munged.log" --seed-file="$S/munge.seed"

# The node as slurmd sees it (real CPU count and memory); CR_CPU so that tasks of 1 CPU share cores' threads.
node="$(slurmd -C | head -1)"
cpus="$(echo "$node" | sed -E 's/.*CPUs=([0-9]+).*/\1/')"
mem="$(echo "$node" | sed -E 's/.*RealMemory=([0-9]+).*/\1/')"
cat > "$S/slurm.conf" <<CONF
ClusterName=transcoders-ci
SlurmctldHost=$host
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge.sock
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
# no cgroups in a container: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$S/slurm.conf"
slurmctld
slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -q idle; then break; fi
    sleep 1
done
sinfo

cli=(dotnet "$root/src/Transcoders.Cli/bin/Release/net10.0/Transcoders.Cli.dll")
[ -f "${cli[1]}" ] || dotnet build "$root/src/Transcoders.Cli" -c Release -nologo -v quiet
export TRANSCODERS_CACHE="$work/cache" TRANSCODERS_DATA="$root/data"
cd "$work"

# A tiny model on a few shipped stories.
{ zcat "$root/data/tinystories/ts_v2_valid_head_part2.txt.gz" || true; } | head -n 1500 > stories.txt || true
"${cli[@]}" corpus --files stories.txt --vocab-size 300 --out corpus >/dev/null
"${cli[@]}" train-lm --files stories.txt --vocab-size 300 --layers 2 --d-model 16 --heads 2 --ctx 64 --batch 4 --steps 4 \
    --warmup 1 --eval-every 2 --checkpoint-every 2 --out lm --device cpu --threads 1 >/dev/null
sweep=(lm/model --tokens corpus --kinds transcoder sae --layers 1 --ks 2 4 --widths 32 --steps 3000 --batch 64 --ctx 32
       --eval-rows 512 --spliced-rows 4 --checkpoint-every 500)

# The sweep on Slurm: prepare, submit the three stages.
"${cli[@]}" sweep "${sweep[@]}" --slurm shared --device cpu
cat shared/jobs.csv
bash shared/submit.sh | tee submit.out
array="$(sed -E 's/.*array job ([0-9]+).*/\1/' submit.out)"

# Stop task 1 mid-run, once it has trained past its first checkpoint.
victim="${array}_1"
victim_dir="shared/runs/$(sed -n 3p shared/jobs.csv | cut -d, -f2)"
for _ in $(seq 600); do
    if ls "$victim_dir/checkpoint" 2>/dev/null | grep -q '^step_' && [ "$(squeue -h -j "$victim" -o %T 2>/dev/null)" = RUNNING ]; then break; fi
    sleep 0.2
done
# The signal reaches the task's step at once; scancel then keeps asking about the (requeued) job and reports an error.
timeout 5 scancel --signal=TERM "$victim" 2>/dev/null || true
echo "sent SIGTERM to $victim"

# Wait for everything (the requeued task and the gather job) to finish.
for _ in $(seq 600); do
    if [ -z "$(squeue -h -o %i)" ]; then break; fi
    sleep 1
done
squeue
log1="$(ls shared/logs/task-"${array}"_1.out)"
echo "---- $log1"; grep -vE '^\s*$' "$log1" | grep -vE '^  *step' | tail -n 25
grep -q "stopped after the checkpoint at step" "$log1" || { echo "slurm test FAILED: task 1 did not stop at a checkpoint" >&2; exit 1; }
grep -q "resuming from the checkpoint at step" "$log1" || { echo "slurm test FAILED: task 1 did not resume" >&2; exit 1; }
grep -q "finished in" "$log1" || { echo "slurm test FAILED: task 1 did not finish" >&2; exit 1; }

# A finished task submitted again is skipped.
rerun="$(sbatch --parsable --wait --array=0 shared/train.sbatch)" || true
grep -q "already finished: skipped" shared/logs/task-"${rerun%%;*}"_0.out || { echo "slurm test FAILED: a finished task was not skipped" >&2; exit 1; }

echo "---- gather"
cat shared/logs/gather-*.out
"${cli[@]}" sweep-gather --table shared >/dev/null

# The same sweep in-process, same seeds and threads.
"${cli[@]}" sweep "${sweep[@]}" --out inproc --cache-activations inproc-cache --device cpu --threads 1 >/dev/null
for f in sweep.csv frontier.csv; do
    if ! diff -u "inproc/$f" "shared/$f"; then echo "slurm test FAILED: gathered $f differs from the in-process sweep's" >&2; exit 1; fi
done
echo "---- gathered sweep.csv (equal to the in-process sweep's)"
cat shared/sweep.csv
echo "slurm test passed: 4 array tasks, task 1 stopped by SIGTERM and resumed, gathered tables equal the in-process sweep"
