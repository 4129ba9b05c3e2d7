#!/usr/bin/env bash
# Remote-image benchmark, side by side in one run: a 1 GiB qcow2 chain (random data, base plus
# a top overwriting a tenth of it) served by nginx (HTTP) and by s3s-fs (S3) on loopback.
#   cold: sequential read of disk.raw with an empty chunk cache, against curl of the base object
#   warm: sequential and random reads with the cache filled, against the same chain mounted
#         from local files
#   random: bytes fetched for 4 KiB random reads covering 5% of the disk, against bytes read
#   anchor: qemu-storage-daemon's HTTP driver (file.driver=http) with its FUSE export
# usage: mount-scripts/bench-remote.sh [WORKDIR]   (needs nginx, s3s-fs, fio, curl,
#        qemu-block-extra for the anchor). VMFS=path (default target/release/vmfs-mount).
# Run it under `flock /work/wt/bench.lock` (or any lock) on shared machines.
set -euo pipefail
cd "$(dirname "$0")/.."
VMFS=$(realpath "${VMFS:-target/release/vmfs-mount}")
W=${1:-$(mktemp -d /tmp/vmfs-bench-remote.XXXXXX)}
mkdir -p "$W"; W=$(realpath "$W")
AK=benchaccess; SK=bench-secret-key-0123
S3H="x-amz-content-sha256: UNSIGNED-PAYLOAD"  # s3s-fs insists on the header
pids=()
cleanup() {
  for m in "$W"/mnt-*; do mountpoint -q "$m" 2>/dev/null && umount "$m" 2>/dev/null; done
  for m in "$W"/qsd-*.raw; do [ -e "$m" ] && umount "$m" 2>/dev/null; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
mib_s() { python3 -c "print(f'{$1/1048576/$2:.0f}')"; }
now() { date +%s.%N; }
say() { echo "$*" | tee -a "$W/results.txt"; }
: > "$W/results.txt"

# --- the chain ---
if [ ! -e "$W/www/vm/top.qcow2" ]; then
  mkdir -p "$W/www/vm"
  head -c 1G /dev/urandom > "$W/seed.raw"
  qemu-img convert -q -f raw -O qcow2 "$W/seed.raw" "$W/www/vm/base.qcow2"; rm -f "$W/seed.raw"
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$W/www/vm/top.qcow2"
  for i in $(seq 0 15); do  # a tenth of the disk overwritten, in 16 runs of 6.4 MiB
    head -c 6710886 /dev/urandom > "$W/pat"
    qemu-io -f qcow2 -c "write -s $W/pat $((i * 64 << 20)) 6710886" "$W/www/vm/top.qcow2" > /dev/null
  done
  rm -f "$W/pat"
fi
SIZE=$((1 << 30))

# --- servers ---
hp=$(port)
mkdir -p "$W/nginx"
cat > "$W/nginx/nginx.conf" <<EOF
daemon off; worker_processes 2; pid $W/nginx/pid; error_log $W/nginx/error.log;
events { worker_connections 512; }
http { access_log off; sendfile on; client_body_temp_path $W/nginx; proxy_temp_path $W/nginx;
  fastcgi_temp_path $W/nginx; uwsgi_temp_path $W/nginx; scgi_temp_path $W/nginx;
  server { listen 127.0.0.1:$hp; root $W/www; } }
EOF
nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" & pids+=($!); wait_port "$hp"
sp=$(port); mkdir -p "$W/s3"
"${S3S_FS:-s3s-fs}" --host 127.0.0.1 --port "$sp" --access-key $AK --secret-key $SK "$W/s3" > "$W/s3s.log" 2>&1 & pids+=($!)
wait_port "$sp"
S3=http://127.0.0.1:$sp
curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H "$S3H" -X PUT "$S3/bench" > /dev/null || true
for f in base.qcow2 top.qcow2; do
  curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H "$S3H" -T "$W/www/vm/$f" "$S3/bench/vm/$f" > /dev/null
done
export AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK AWS_ENDPOINT_URL=$S3 AWS_REGION=us-east-1
HTTP_URL=http://127.0.0.1:$hp/vm/top.qcow2
S3_URL=s3://bench/vm/top.qcow2

fetched() { # LOG: bytes fetched, summed over the objects' last statistics lines
  python3 - "$1" <<'PY'
import re, sys
last = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"(\S+): \d+ reads, .* (\d+) bytes fetched in", line)
    if m:
        last[m.group(1)] = int(m.group(2))
print(sum(last.values()))
PY
}
vmount() { # URL MNT LOG CACHE [extra]: mounts read-only
  mkdir -p "$2"; "$VMFS" -r -v --log-file "$3" --cache-dir "$4" "${@:5}" "$1" "$2"; }
seqread() { # FILE -> MiB/s (1 MiB reads, O_DIRECT, queue depth 4)
  fio --name=s --filename="$1" --rw=read --bs=1M --iodepth=4 --ioengine=libaio --direct=1 --size=$SIZE \
      --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{print int($7/1024)}'; }
randiops() { # FILE [QD] -> IOPS (4 KiB, queue depth QD (32), 8 s)
  fio --name=r --filename="$1" --rw=randread --bs=4k --iodepth="${2:-32}" --ioengine=libaio --direct=1 --size=$SIZE \
      --time_based --runtime=8 --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{print $8}'; }

# --- local reference ---
mkdir -p "$W/mnt-local"; "$VMFS" -r "$W/www/vm/top.qcow2" "$W/mnt-local"
local_seq=$(seqread "$W/mnt-local/disk.raw"); local_rand=$(randiops "$W/mnt-local/disk.raw")
umount "$W/mnt-local"
say "local seqread_1M_qd4 $local_seq MiB/s"
say "local randread_4k_qd32 $local_rand IOPS"

for kind in http s3; do
  if [ $kind = http ]; then url=$HTTP_URL; else url=$S3_URL; fi
  # curl of the base object (1 GiB), the network's own speed.
  t0=$(now)
  if [ $kind = http ]; then curl -sf -o /dev/null "http://127.0.0.1:$hp/vm/base.qcow2"
  else curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H "$S3H" -o /dev/null "$S3/bench/vm/base.qcow2"; fi
  t1=$(now); bsize=$(stat -c %s "$W/www/vm/base.qcow2")
  curl_mib=$(mib_s "$bsize" "$(echo "$t1 - $t0" | bc)")
  say "$kind curl_base $curl_mib MiB/s"
  # Cold: empty cache.
  cache=$W/cache-$kind; rm -rf "$cache"; mnt=$W/mnt-$kind; log=$W/$kind-cold.log; : > "$log"
  vmount "$url" "$mnt" "$log" "$cache"
  t0=$(now); dd if="$mnt/disk.raw" of=/dev/null bs=1M iflag=direct status=none; t1=$(now)
  cold=$(mib_s $SIZE "$(echo "$t1 - $t0" | bc)")
  umount "$mnt"; sleep 0.5
  say "$kind cold_seqread $cold MiB/s (x$(python3 -c "print(f'{$cold/$curl_mib:.2f}')") of curl)"
  # Warm: the cache is full now.
  log=$W/$kind-warm.log; : > "$log"; vmount "$url" "$mnt" "$log" "$cache"
  warm_seq=$(seqread "$mnt/disk.raw"); warm_rand=$(randiops "$mnt/disk.raw")
  umount "$mnt"; sleep 0.5
  say "$kind warm_seqread_1M_qd4 $warm_seq MiB/s (x$(python3 -c "print(f'{$warm_seq/$local_seq:.2f}')") of local)"
  say "$kind warm_randread_4k_qd32 $warm_rand IOPS (x$(python3 -c "print(f'{$warm_rand/$local_rand:.2f}')") of local)"
  # Random 4 KiB reads covering 5% of the disk, empty cache: bytes fetched / bytes read.
  rm -rf "$cache"; log=$W/$kind-rand.log; : > "$log"; vmount "$url" "$mnt" "$log" "$cache"
  want=$((SIZE / 20))
  fio --name=p --filename="$mnt/disk.raw" --rw=randread --bs=4k --iodepth=8 --ioengine=libaio --direct=1 \
      --size=$SIZE --io_size=$want --randseed=42 --output-format=terse > /dev/null 2>&1
  umount "$mnt"; sleep 0.5
  got=$(fetched "$log")
  say "$kind random_5pct fetched $got bytes for $want read (x$(python3 -c "print(f'{$got/$want:.2f}')"))"
done

# --- anchor: qemu-storage-daemon's curl-based HTTP driver, FUSE export ---
if [ -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ]; then
  q=$W/qsd-http.raw; touch "$q"
  qemu-storage-daemon --blockdev "driver=qcow2,node-name=n,read-only=on,file.driver=http,file.url=$HTTP_URL,file.readahead=1048576" \
      --export type=fuse,id=e,node-name=n,mountpoint="$q",writable=off > "$W/qsd.log" 2>&1 & qpid=$!; pids+=($qpid)
  for _ in $(seq 200); do grep -q " $q " /proc/mounts && break; kill -0 $qpid 2>/dev/null || break; sleep 0.05; done
  grep -q " $q " /proc/mounts || { cat "$W/qsd.log"; exit 1; }
  t0=$(now); dd if="$q" of=/dev/null bs=1M iflag=direct status=none; t1=$(now)
  qsd_seq=$(mib_s $SIZE "$(echo "$t1 - $t0" | bc)")
  # Random reads at queue depth 1 and 32; qemu's curl driver has been seen to hang for good
  # with many requests in flight, so each run is bounded and a hung daemon is killed, which
  # aborts its FUSE connection and fails the stuck reads.
  qsd_rand=(); for qd in 1 32; do
    randiops "$q" $qd > "$W/qsd-rand.txt" & fpid=$!
    for _ in $(seq 600); do kill -0 $fpid 2>/dev/null || break; sleep 0.1; done
    if kill -0 $fpid 2>/dev/null; then
      kill -9 $qpid 2>/dev/null; wait $fpid 2>/dev/null || true; qsd_rand+=(hung); break
    fi
    wait $fpid; qsd_rand+=("$(cat "$W/qsd-rand.txt")")
  done
  umount "$q" 2>/dev/null || umount -l "$q"; kill $qpid 2>/dev/null; wait $qpid 2>/dev/null || true
  # vmfs-mount cold, same URL, same reads.
  cache=$W/cache-anchor; rm -rf "$cache"; mnt=$W/mnt-anchor; log=$W/anchor.log; : > "$log"
  vmount "$HTTP_URL" "$mnt" "$log" "$cache"
  t0=$(now); dd if="$mnt/disk.raw" of=/dev/null bs=1M iflag=direct status=none; t1=$(now)
  v_seq=$(mib_s $SIZE "$(echo "$t1 - $t0" | bc)")
  umount "$mnt"; sleep 0.5; rm -rf "$cache"; vmount "$HTTP_URL" "$mnt" "$log" "$cache"
  v_rand1=$(randiops "$mnt/disk.raw" 1); umount "$mnt"; sleep 0.5
  rm -rf "$cache"; vmount "$HTTP_URL" "$mnt" "$log" "$cache"
  v_rand32=$(randiops "$mnt/disk.raw" 32); umount "$mnt"
  say "anchor qsd_http cold_seqread $qsd_seq MiB/s, vmfs-mount $v_seq MiB/s (x$(python3 -c "print(f'{$v_seq/$qsd_seq:.2f}')"))"
  ratio() { case $2 in hung|"") echo "qsd hung: reads never completed in 60 s";; *) python3 -c "print(f'x{$1/max($2,1):.2f}')";; esac; }
  say "anchor qsd_http cold_randread_4k_qd1 ${qsd_rand[0]:-hung} IOPS, vmfs-mount $v_rand1 IOPS ($(ratio "$v_rand1" "${qsd_rand[0]:-hung}"))"
  say "anchor qsd_http cold_randread_4k_qd32 ${qsd_rand[1]:-hung} IOPS, vmfs-mount $v_rand32 IOPS ($(ratio "$v_rand32" "${qsd_rand[1]:-hung}"))"
else
  say "anchor skipped: qemu-block-extra (block-curl.so) is not installed"
fi
echo "results in $W/results.txt"
