#!/usr/bin/env bash
# Run a benchmark longer than one device call (10 minutes) across back-to-back calls, detached
# from the call that starts it: the first call starts COMMAND in its own session, in a copy of the
# current folder (/tmp/detached/NAME/tree: the next call may lay a fresh checkout over this one),
# its output folder /tmp/detached/NAME/out passed as OUT, its log /tmp/detached/NAME/log.txt;
# every call, the first included, then waits up to SECONDS for it to end and copies its output
# folder and log to the call's $OUT. Calls after the first only wait and copy, while the machine
# stays warm. Where the device ends a call's processes with it, the next call finds COMMAND gone
# without its exit status and starts it again (a resumable benchmark continues). DETACHED_HOME
# moves /tmp/detached.
#   bash benchmarks/device_detached.sh study 560 bash benchmarks/gpu_shapes_geneval.sh 0,1 1500 gpu-compiled
set -uo pipefail
name=$1 seconds=$2
shift 2
home=${DETACHED_HOME:-/tmp/detached}/$name
mkdir -p "$home/out"
OUT=${OUT:-/tmp/out}
alive() {  # whether COMMAND's process exists and is not a zombie left unreaped
  local pid
  pid=$(cat "$home/pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null &&
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}
if alive; then
  echo "detached: $name is running (pid $(cat "$home/pid")); waiting"
elif [ -f "$home/status" ]; then
  echo "detached: $name ended earlier with exit $(cat "$home/status")"
else
  [ -f "$home/pid" ] && echo "detached: $name (pid $(cat "$home/pid")) is gone without an exit status; starting it again"
  rm -rf "$home/tree" && cp -a . "$home/tree" && cd "$home/tree" || exit 1
  OUT=$home/out setsid nohup bash -c '"$@"; echo $? > "$0/status"' "$home" "$@" \
    >> "$home/log.txt" 2>&1 < /dev/null &
  echo $! > "$home/pid"
  echo "detached: started $name (pid $!): $*"
fi
end=$(( $(date +%s) + seconds ))
while [ ! -f "$home/status" ] && alive && [ "$(date +%s)" -lt "$end" ]; do
  sleep 1
done
[ -f "$home/status" ] && echo "detached: $name ended with exit $(cat "$home/status")"
mkdir -p "$OUT"
cp -r "$home/out/." "$OUT/" 2>/dev/null
cp "$home/log.txt" "$OUT/detached-log.txt"
