#!/bin/bash
# Mounts every image of a digests.tsv corpus through FUSE and checks the sha256 of every view.
# Usage: verify-digests.sh IMAGES_DIR [VMFS_MOUNT_BINARY]
# IMAGES_DIR holds digests.tsv (image, format, view, size, sha256, note; sha256 "-" means the
# image must be refused or has no oracle). The corpus is copied to a scratch directory and
# decompressed there; nothing is written to IMAGES_DIR.
set -u
src=$(realpath "$1")
bin=${2:-vmfs-mount}
work=$(mktemp -d)
mnt=$work/.mnt
mkdir -p "$mnt"
unmount() {
    if [ "$(id -u)" = 0 ]; then umount "$mnt"; else fusermount3 -u "$mnt"; fi
}
cleanup() {
    mountpoint -q "$mnt" && unmount
    rm -rf "$work"
}
trap cleanup EXIT
cp -r "$src"/. "$work"/
find "$work" -name '*.gz' -exec gunzip -f {} +
find "$work" -name '*.bz2' -exec bunzip2 -f {} +

pass=0 fail=0
while IFS=$'\t' read -r image format view size sha note; do
    case $image in '#'*|'') continue ;; esac
    img=$work/${image%.gz}
    img=${img%.bz2}
    if ! err=$("$bin" -r "$img" "$mnt" 2>&1); then
        if [ "$sha" = - ]; then
            echo "ok      $image: refused: $err"; pass=$((pass + 1))
        else
            echo "FAIL    $image: $err"; fail=$((fail + 1))
        fi
        continue
    fi
    if [ "$sha" = - ]; then
        echo "note    $image: mounted although digests.tsv has no oracle ($note)"
    else
        got=$(sha256sum < "$mnt/$view" | cut -d' ' -f1)
        gotsize=$(stat -c %s "$mnt/$view" 2>/dev/null)
        if [ "$got" = "$sha" ] && [ "$gotsize" = "$size" ]; then
            echo "ok      $image $view"; pass=$((pass + 1))
        else
            echo "FAIL    $image $view: sha256 $got size $gotsize (want $sha, $size)"; fail=$((fail + 1))
        fi
    fi
    unmount
done < "$src/digests.tsv"
echo "$pass ok, $fail failed"
[ "$fail" = 0 ]
