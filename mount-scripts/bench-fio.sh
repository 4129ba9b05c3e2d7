#!/bin/sh
# Read throughput of a file with fio: 1M sequential and 4k random reads, O_DIRECT, libaio,
# iodepth 1 and 32. Usage: bench-fio.sh FILE [SECONDS]
# Compare a plain image, vmfs-mount's disk.raw and qemu-storage-daemon's FUSE export:
#   vmfs-mount -r big.img mnt && bench-fio.sh mnt/disk.raw
#   qemu-storage-daemon --blockdev driver=raw,node-name=n,file.driver=file,file.filename=big.img \
#       --export type=fuse,id=e,node-name=n,mountpoint=export.raw &   # export.raw: an empty file
#   bench-fio.sh export.raw
set -e
file=$1
secs=${2:-10}
for job in "read 1M 1" "read 1M 32" "randread 4k 1" "randread 4k 32"; do
    set -- $job
    result=$(fio --name=bench --filename="$file" --readonly --rw="$1" --bs="$2" --iodepth="$3" \
        --ioengine=libaio --direct=1 --runtime="$secs" --time_based --group_reporting \
        --output-format=terse --terse-version=3)
    # terse v3: field 7 = read bandwidth (KiB/s), field 8 = read IOPS
    echo "$result" | awk -F';' -v j="$1 bs=$2 qd=$3" '{ printf "%-22s %10.1f MiB/s %10d IOPS\n", j, $7/1024, $8 }'
done
