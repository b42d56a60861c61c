#!/usr/bin/env bash
# Builds the bare-metal kernel and runs its test suite under QEMU.
#
#   baremetal/run.sh [--arch A] [--smp N] [--single] [--timeout S] [--debug] [--append STR]
#
#   --arch A      x86_64 (default), aarch64 (QEMU virt, GICv3) or riscv64 (QEMU virt, OpenSBI)
#   --smp N       virtual CPUs (default 2)
#   --single      single-threaded TCG (-accel tcg,thread=single): one host thread runs every
#                 vCPU in turn. Default: multi-threaded TCG, real parallelism (one thread per
#                 vCPU), which is slow when vCPUs outnumber host cores.
#   --timeout S   wall-clock bound for QEMU (default 60)
#   --debug       build the dev profile instead of release
#   --append STR  kernel command line (e.g. "hotplug-strict": see README.md)
#
# Exit status: 0 if the suite passed (QEMU exits with status 33: x86_64 through isa-debug-exit,
# 0x10 << 1 | 1; aarch64 through semihosting SYS_EXIT; riscv64 through the sifive_test device),
# 1 otherwise (a failing suite: 35; a timeout: 124; a crash or triple fault: anything else).
# Installs the QEMU package (qemu-system-x86, qemu-system-arm, qemu-system-misc) with apt-get
# and the Rust target (aarch64-unknown-none, riscv64imac-unknown-none-elf) with rustup when
# missing.
set -euo pipefail
cd "$(dirname "$0")"

arch=x86_64
smp=2
single=0
tmo=60
profile=release
append=""
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="$2"; shift 2 ;;
        --smp) smp="$2"; shift 2 ;;
        --single) single=1; shift ;;
        --timeout) tmo="$2"; shift 2 ;;
        --debug) profile=dev; shift ;;
        --append) append="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

case "$arch" in
    x86_64) qemu=qemu-system-x86_64; pkg=qemu-system-x86; target=x86_64-unknown-linux-gnu ;;
    aarch64) qemu=qemu-system-aarch64; pkg=qemu-system-arm; target=aarch64-unknown-none ;;
    riscv64) qemu=qemu-system-riscv64; pkg=qemu-system-misc; target=riscv64imac-unknown-none-elf ;;
    *) echo "run.sh: unknown --arch $arch (x86_64, aarch64, riscv64)" >&2; exit 2 ;;
esac

if ! command -v "$qemu" >/dev/null 2>&1; then
    echo "run.sh: $qemu missing; installing $pkg" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$pkg" >/dev/null
fi
if [ "$arch" != x86_64 ] && ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "run.sh: installing the Rust target $target" >&2
    rustup target add "$target"
fi

cargo build --profile "$profile" --quiet --target "$target"
dir=$([ "$profile" = dev ] && echo debug || echo release)
kernel="target/$target/$dir/smpcall-baremetal"

accel=(-accel tcg)
mode="multi-threaded TCG"
if [ "$single" = 1 ]; then
    accel=(-accel tcg,thread=single)
    mode="single-threaded TCG"
fi
echo "run.sh: QEMU $arch, $smp CPUs, $mode, timeout ${tmo}s"

# stdin from /dev/null: `-serial stdio` fails when stdin is closed (as under CI), and the
# guest reads no input anyway.
status=0
case "$arch" in
    x86_64) machine=(-machine pc -cpu qemu64 -m 128M
                     -device isa-debug-exit,iobase=0xf4,iosize=0x04
                     ${append:+-append "$append"}) ;;
    aarch64) machine=(-machine virt,gic-version=3 -cpu cortex-a57 -m 256M
                      -semihosting-config enable=on,target=native
                      ${append:+-append "$append"}) ;;
    riscv64) machine=(-machine virt -bios default -m 256M
                      ${append:+-append "$append"}) ;;
esac
timeout --kill-after=5 "$tmo" "$qemu" \
    "${machine[@]}" "${accel[@]}" -smp "$smp" \
    -display none -monitor none -serial stdio -no-reboot \
    -kernel "$kernel" </dev/null || status=$?

case "$status" in
    33) echo "run.sh: PASS (QEMU exit status 33)"; exit 0 ;;
    35) echo "run.sh: FAIL: the test suite reported failures (QEMU exit status 35)" ;;
    124|137) echo "run.sh: FAIL: timed out after ${tmo}s" ;;
    *) echo "run.sh: FAIL: QEMU exit status $status (crash, triple fault or no exit device)" ;;
esac
exit 1
