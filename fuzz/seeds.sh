#!/usr/bin/env bash
# Builds small seed corpora in fuzz/corpus/<target>/ with qemu-img (not committed: run this
# before fuzzing). Multi-file inputs are joined with the harness's separator
# (tests/fuzz_support: SPLIT), in the order of the target's file names.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d /tmp/hostile-seeds-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
SPLIT=$'\n--8<--FILE--8<--\n'
join() { # out file...
  local out=$1; shift; : > "$out"; local first=1
  for f in "$@"; do
    [ $first = 1 ] || printf '%s' "$SPLIT" >> "$out"
    cat "$f" >> "$out"; first=0
  done
}
io() { qemu-io -f "$1" -c "$3" "$2" >/dev/null; }
mkdir -p corpus/{probe,qcow2,vmdk,vhd,vhdx,vdi,partition}
cd "$tmp"

# qcow2: plain, small clusters, compressed, snapshot, extended L2, backing chain.
qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 64K
io qcow2 a.qcow2 "write -P 0x5a 0 4K"
cp a.qcow2 "$OLDPWD/corpus/qcow2/plain"
qemu-img snapshot -c snap1 a.qcow2
io qcow2 a.qcow2 "write -P 0x11 8K 1K"
cp a.qcow2 "$OLDPWD/corpus/qcow2/snapshot"
qemu-img create -q -f qcow2 -o cluster_size=16384,extended_l2=on b.qcow2 128K
io qcow2 b.qcow2 "write -P 0x33 1K 2K"
cp b.qcow2 "$OLDPWD/corpus/qcow2/extended_l2"
qemu-img create -q -f raw r.raw 64K
io raw r.raw "write -P 0x77 0 64K"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 r.raw c.qcow2
cp c.qcow2 "$OLDPWD/corpus/qcow2/compressed"
qemu-img create -q -f raw base.img 64K
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.img -F raw top.qcow2 64K
io qcow2 top.qcow2 "write -P 0x22 512 512"
join "$OLDPWD/corpus/qcow2/chain" top.qcow2 base.img

# vmdk: monolithicSparse chain, split sparse, streamOptimized.
qemu-img create -q -f vmdk base.vmdk 1M
io vmdk base.vmdk "write -P 0x44 0 64K"
qemu-img create -q -f vmdk -b base.vmdk -F vmdk top.vmdk 1M
io vmdk top.vmdk "write -P 0x45 64K 4K"
join "$OLDPWD/corpus/vmdk/chain" top.vmdk base.vmdk
rm -f top.vmdk top-s001.vmdk
qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse top.vmdk 1M
io vmdk top.vmdk "write -P 0x46 0 4K"
join "$OLDPWD/corpus/vmdk/split" top.vmdk /dev/null top-s001.vmdk
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized r.raw s.vmdk
cp s.vmdk "$OLDPWD/corpus/vmdk/stream"

# vhd: dynamic and fixed.
qemu-img convert -q -f raw -O vpc -o subformat=dynamic r.raw d.vhd
cp d.vhd "$OLDPWD/corpus/vhd/dynamic"
qemu-img convert -q -f raw -O vpc -o subformat=fixed r.raw f.vhd
cp f.vhd "$OLDPWD/corpus/vhd/fixed"

# vhdx: dynamic, 1 MiB blocks (qemu-img's smallest).
qemu-img create -q -f vhdx -o block_size=1M x.vhdx 4M
io vhdx x.vhdx "write -P 0x66 0 4K"
cp x.vhdx "$OLDPWD/corpus/vhdx/dynamic"

# vdi: dynamic base (the differencing VDI comes from the tests' generators, below).
qemu-img convert -q -f raw -O vdi r.raw base.vdi
join "$OLDPWD/corpus/vdi/base" base.vdi
cp base.vdi "$OLDPWD/corpus/probe/vdi"

# probe and partition: one of each format; an MBR and a GPT disk.
cp "$OLDPWD"/corpus/qcow2/plain "$OLDPWD"/corpus/vhd/dynamic "$OLDPWD"/corpus/vmdk/stream "$OLDPWD/corpus/probe/"
qemu-img create -q -f raw disk.raw 2M
if command -v sgdisk >/dev/null; then
  sgdisk -q -n 1:34:1000 -n 2:1001:2000 disk.raw >/dev/null && cp disk.raw "$OLDPWD/corpus/partition/gpt"
fi
printf 'label: dos\n2048,1024,83\n,,5\n,512,83\n' | sfdisk -q disk.raw >/dev/null 2>&1 || true
head -c 4M disk.raw > "$OLDPWD/corpus/partition/mbr"
# Layouts qemu-img cannot make (COWD and seSparse VMDK deltas, a differencing VDI, a VHDX
# with a dirty log) come from the tests' generators (tests/fuzz_seeds.rs).
corpus=$(cd "$OLDPWD" && pwd)/corpus
(cd "$corpus/../.." && FUZZ_SEEDS_OUT="$corpus" cargo test -q --test fuzz_seeds -- --ignored >/dev/null)
echo "seeds in $corpus"
