#!/usr/bin/env bash
# Soak (not in CI): one daemon, DURATION seconds of mixed fio over several read-only views of a
# qcow2 chain (live disk, backing layer, internal snapshot, changes/ file) and over writable
# clones (--clones DIR), while clones are also created and removed; every SAMPLE seconds it
# records the daemon's RSS and open fd count from /proc. Ends with qemu-img check of every clone
# and a summary: RSS and fd count after warm-up against the end (they should stay flat).
# Usage: soak.sh WORKDIR [VMFS_BINARY]   (needs fio, qemu-img, qemu-io; WORKDIR gets ~2*SIZE)
# DURATION (default 1800), SAMPLE (default 30), SIZE of the image (default 512M), CLONES (default 4).
set -u
W=$(realpath -m "$1"); BIN=$(realpath "${2:-target/release/vmfs-mount}")
DURATION=${DURATION:-1800}; SAMPLE=${SAMPLE:-30}; SIZE=${SIZE:-512M}; CLONES=${CLONES:-4}
mkdir -p "$W"; cd "$W" || exit 1
rm -rf clones mnt; mkdir -p clones mnt
if [ ! -f golden.qcow2 ]; then
    head -c "$SIZE" /dev/urandom > base.raw
    qemu-img convert -q -f raw -O qcow2 base.raw base.qcow2 && rm base.raw
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 golden.qcow2
    qemu-io -f qcow2 -c "write -P 0x5a 0 64M" golden.qcow2 > /dev/null
    qemu-img snapshot -c snap1 golden.qcow2
    qemu-io -f qcow2 -c "write -P 0xa5 32M 64M" golden.qcow2 > /dev/null
fi

"$BIN" --clones "$W/clones" "$W/golden.qcow2" "$W/mnt" || exit 1
pid=$(pgrep -f -x "$BIN --clones $W/clones $W/golden.qcow2 $W/mnt" | head -1)
[ -n "$pid" ] || { echo "daemon not found"; exit 1; }
for i in $(seq "$CLONES"); do mkdir "mnt/clones/c$i"; done

jobs=(--name=live --filename=mnt/disk.raw --rw=randread --ioengine=psync
      --name=base --filename=mnt/snapshots/base/disk.raw --rw=randread --ioengine=psync
      --name=snap --filename=mnt/snapshots/snap1/disk.raw --rw=read --ioengine=psync
      --name=changes --filename=mnt/changes/base.raw --rw=read --ioengine=psync)
for i in $(seq "$CLONES"); do
    jobs+=(--name="c$i" --filename="mnt/clones/c$i/disk.raw" --rw=randrw --rwmixread=60
           --ioengine=libaio --direct=1 --iodepth=4 --fsync=64)
done
fio --bsrange=4k-64k --size="$SIZE" --time_based --runtime="$DURATION" --randrepeat=0 \
    --output-format=terse --terse-version=3 "${jobs[@]}" > fio.terse 2> fio.err &
fio_pid=$!

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
fds() { ls "/proc/$pid/fd" | wc -l; }
echo "t_s rss_kib fds" > samples.txt
start=$(date +%s); n=0
while kill -0 "$fio_pid" 2> /dev/null; do
    now=$(date +%s)
    echo "$((now - start)) $(rss_kib) $(fds)" | tee -a samples.txt
    # Clone churn between samples: create, write, sync and remove one clone.
    n=$((n + 1))
    if mkdir "mnt/clones/churn$n"; then
        dd if=/dev/urandom of="mnt/clones/churn$n/disk.raw" bs=64k count=64 seek=$((n % 64)) \
            conv=notrunc,fsync status=none || echo "churn$n: write failed"
        rmdir "mnt/clones/churn$n" || echo "churn$n: rmdir failed"
    else
        echo "churn$n: mkdir failed"
    fi
    sleep "$SAMPLE" & wait $! 2> /dev/null   # pacing, not synchronisation
done
wait "$fio_pid"; fio_rc=$?
now=$(date +%s); echo "$((now - start)) $(rss_kib) $(fds)" | tee -a samples.txt
umount "$W/mnt"
check=0
for f in clones/*.qcow2; do
    qemu-img check -q "$f" || { echo "qemu-img check failed: $f"; check=1; }
done

{
    echo "soak: ${DURATION}s, $CLONES clones + 4 read-only views, image $SIZE, fio rc $fio_rc, qemu-img check $([ $check = 0 ] && echo clean || echo FAILED)"
    awk -F';' '{r+=$6; w+=$47} END {printf "fio: %.0f MiB read, %.0f MiB written in total\n", r/1024, w/1024}' fio.terse
    # Warm-up: the first sample at or after 5 minutes (or the second sample in short runs).
    awk 'NR > 1 {t[NR]=$1; r[NR]=$2; f[NR]=$3; if (r[NR] > mr) mr = r[NR]; if (f[NR] > mf) mf = f[NR];
                 if (!w && ($1 >= 300 || NR == 3)) w = NR}
         END {if (!w) w = 2;
              printf "RSS KiB: start %d, after warm-up (t=%ds) %d, max %d, end %d (end/warm-up %.2f)\n",
                     r[2], t[w], r[w], mr, r[NR], r[NR]/r[w];
              printf "open fds: start %d, after warm-up %d, max %d, end %d\n", f[2], f[w], mf, f[NR]}' samples.txt
} | tee summary.txt
[ -s fio.err ] && { echo "fio stderr:"; head -5 fio.err; }
[ "$fio_rc" = 0 ] && [ "$check" = 0 ]
