#!/usr/bin/env bash
# Builds the bare-metal kernel and runs its test suite under QEMU.
#
#   baremetal/run.sh [--smp N] [--single] [--timeout S] [--debug] [--append STR]
#
#   --smp N       virtual CPUs (default 2)
#   --single      single-threaded TCG (-accel tcg,thread=single): one host thread runs every
#                 vCPU in turn. Default: multi-threaded TCG, real parallelism (one thread per
#                 vCPU), which is slow when vCPUs outnumber host cores.
#   --timeout S   wall-clock bound for QEMU (default 60)
#   --debug       build the dev profile instead of release
#   --append STR  kernel command line (e.g. "hotplug-strict": see README.md)
#
# Exit status: 0 if the suite passed (QEMU's isa-debug-exit status 33 = 0x10 << 1 | 1),
# 1 otherwise (a failing suite: 35; a timeout: 124; a crash or triple fault: anything else).
# Installs qemu-system-x86 with apt-get when qemu-system-x86_64 is missing.
set -euo pipefail
cd "$(dirname "$0")"

smp=2
single=0
tmo=60
profile=release
append=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smp) smp="$2"; shift 2 ;;
        --single) single=1; shift ;;
        --timeout) tmo="$2"; shift 2 ;;
        --debug) profile=dev; shift ;;
        --append) append="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "run.sh: qemu-system-x86_64 missing; installing qemu-system-x86" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-system-x86 >/dev/null
fi

cargo build --profile "$profile" --quiet
dir=$([ "$profile" = dev ] && echo debug || echo release)
kernel="target/x86_64-unknown-linux-gnu/$dir/smpcall-baremetal"

accel=(-accel tcg)
mode="multi-threaded TCG"
if [ "$single" = 1 ]; then
    accel=(-accel tcg,thread=single)
    mode="single-threaded TCG"
fi
echo "run.sh: QEMU, $smp CPUs, $mode, timeout ${tmo}s"

# stdin from /dev/null: `-serial stdio` fails when stdin is closed (as under CI), and the
# guest reads no input anyway.
status=0
timeout --kill-after=5 "$tmo" qemu-system-x86_64 \
    -machine pc "${accel[@]}" -cpu qemu64 -smp "$smp" -m 128M \
    -display none -monitor none -serial stdio -no-reboot \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -kernel "$kernel" ${append:+-append "$append"} </dev/null || status=$?

case "$status" in
    33) echo "run.sh: PASS (QEMU exit status 33)"; exit 0 ;;
    35) echo "run.sh: FAIL: the test suite reported failures (QEMU exit status 35)" ;;
    124|137) echo "run.sh: FAIL: timed out after ${tmo}s" ;;
    *) echo "run.sh: FAIL: QEMU exit status $status (crash, triple fault or no exit device)" ;;
esac
exit 1
