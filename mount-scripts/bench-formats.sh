#!/usr/bin/env bash
# Side-by-side read benchmark per format: vmfs-mount vs qemu-storage-daemon's FUSE export on the
# same image, in one run. Usage: bench-formats.sh WORKDIR [VMFS_BINARY]  (needs fio, qemu-img,
# qemu-storage-daemon; WORKDIR gets ~5 GiB of images). RT=seconds per random-read job (default 6);
# FORMATS="vmdk vpc vhdx vdi" by default.
set -u
W=$(realpath "$1"); BIN=$(realpath "${2:-target/release/vmfs-mount}"); RT=${RT:-6}
mkdir -p "$W"; cd "$W" || exit 1
[ -f src.raw ] || head -c 1024M /dev/urandom > src.raw
fiojob() { fio --name=j --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio --direct=1 \
    $5 --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{print $7, $8}'; }
run() { # MOUNTER FMT FILE
    read -r bw _ < <(fiojob "$3" read 1M 4 "--size=1G"); echo "$1 $2 seqread_1M_qd4 $((bw/1024)) MiB/s"
    read -r _ io < <(fiojob "$3" randread 4k 32 "--time_based --runtime=$RT --size=1G"); echo "$1 $2 randread_4k_qd32 $io IOPS"
}
for fmt in ${FORMATS:-vmdk vpc vhdx vdi}; do
    img=img.$fmt
    [ -f "$img" ] || qemu-img convert -f raw -O "$fmt" src.raw "$img"
    cat "$img" > /dev/null   # both mounters start with the image in the page cache
    mkdir -p mnt
    "$BIN" -r "$img" mnt && run vmfs "$fmt" mnt/disk.raw
    umount mnt
    rm -f q.raw; touch q.raw
    qemu-storage-daemon --blockdev driver=$fmt,node-name=n,file.driver=file,file.filename="$W/$img",file.aio=threads \
        --export type=fuse,id=e,node-name=n,mountpoint="$W/q.raw",writable=off >/dev/null 2>&1 & qpid=$!
    for _ in $(seq 100); do grep -q " $W/q.raw " /proc/mounts && break; sleep 0.1; done
    if grep -q " $W/q.raw " /proc/mounts; then run qsd "$fmt" q.raw; else echo "qsd $fmt did not mount" >&2; fi
    kill "$qpid" 2>/dev/null; wait "$qpid" 2>/dev/null
done | tee results.txt
awk '$1=="vmfs"{v[$2" "$3]=$4} $1=="qsd"{q[$2" "$3]=$4}
     END{for (k in v) if (q[k] > 0) printf "ratio vmfs/qsd %s %.2f\n", k, v[k]/q[k]}' results.txt | sort
