#!/usr/bin/env bash
# Clones at scale, in one run: a mount with 1 clone against a mount with 64 clones of the
# same golden image, 16 of them under concurrent fio (16 fio jobs at queue depth 4 in both
# runs: on the one clone, or one job per clone). Reports the daemon's RSS (64 clones /
# 1 clone, goal < 2) and aggregate random-read IOPS (16 clones / 1 clone, goal >= 1).
# Usage: bench-clones.sh WORKDIR [VMFS_BINARY]   (needs fio, qemu-img; WORKDIR gets ~1.5 GiB)
# RT=seconds per fio job (default 10); SIZE of the golden image (default 1G).
set -u
W=$(realpath "$1"); BIN=$(realpath "${2:-target/release/vmfs-mount}"); RT=${RT:-10}; SIZE=${SIZE:-1G}
mkdir -p "$W"; cd "$W" || exit 1
if [ ! -f golden.qcow2 ]; then
    head -c "$SIZE" /dev/urandom > golden.raw
    qemu-img convert -f raw -O qcow2 golden.raw golden.qcow2 && rm golden.raw
fi
cat golden.qcow2 > /dev/null   # both mounts start with the image in the page cache

daemon_pid() { pgrep -f -x "$BIN --clones $W/$1 $W/golden.qcow2 $W/mnt-$1" | head -1; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# fio over the given files at once (one job each, so the same load generator drives both
# mounts); prints aggregate read IOPS and write IOPS.
fio_on() { # RW FILES...
    local rw=$1; shift
    local args=() n=0
    for f in "$@"; do n=$((n+1)); args+=(--name="j$n" --filename="$f"); done
    fio --rw="$rw" --bs=4k --iodepth=4 --ioengine=libaio --direct=1 --size="$SIZE" \
        --time_based --runtime="$RT" --randrepeat=0 --group_reporting --output-format=terse \
        --terse-version=3 "${args[@]}" 2>/dev/null | awk -F';' '{print $8, $49}'
}
setup() { # NAME COUNT
    rm -rf "$W/$1" "$W/mnt-$1"; mkdir -p "$W/$1" "$W/mnt-$1"
    "$BIN" --clones "$W/$1" "$W/golden.qcow2" "$W/mnt-$1" || exit 1
    for i in $(seq "$2"); do mkdir "$W/mnt-$1/clones/c$i"; done
}

setup one 1
pid=$(daemon_pid one)
one=(); for i in $(seq 16); do one+=("$W/mnt-one/clones/c1/disk.raw"); done
read -r one_rr _ < <(fio_on randread "${one[@]}")
read -r one_mr one_mw < <(fio_on randrw "${one[@]}")
one_rss=$(rss_kib "$pid")
umount "$W/mnt-one"

setup many 64
pid=$(daemon_pid many)
files=(); for i in $(seq 16); do files+=("$W/mnt-many/clones/c$i/disk.raw"); done
read -r many_rr _ < <(fio_on randread "${files[@]}")
read -r many_mr many_mw < <(fio_on randrw "${files[@]}")
many_rss=$(rss_kib "$pid")
umount "$W/mnt-many"

{
    echo "1 clone:   randread ${one_rr} IOPS; randrw ${one_mr} r + ${one_mw} w IOPS; RSS ${one_rss} KiB"
    echo "64 clones: randread ${many_rr} IOPS over 16 clones; randrw ${many_mr} r + ${many_mw} w IOPS over 16; RSS ${many_rss} KiB"
    awk -v a="$many_rss" -v b="$one_rss" 'BEGIN{printf "ratio RSS 64 clones / 1 clone %.2f (goal < 2)\n", a/b}'
    awk -v a="$many_rr" -v b="$one_rr" 'BEGIN{printf "ratio randread IOPS 16 clones / 1 clone %.2f (goal >= 1)\n", a/b}'
    awk -v a="$many_mr" -v b="$one_mr" -v c="$many_mw" -v d="$one_mw" \
        'BEGIN{printf "ratio randrw IOPS 16 clones / 1 clone %.2f read, %.2f write\n", a/b, c/d}'
} | tee results-clones.txt
