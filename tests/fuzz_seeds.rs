//! Seed inputs qemu-img cannot make, from the tests' own generators: an ESX redo log
//! (COWD / VMFSSPARSE) and an ESXi seSparse delta over a sparse VMDK, a VirtualBox
//! differencing VDI over its base, and a VHDX with a dirty log to replay. fuzz/seeds.sh runs
//! this (ignored by default) with FUZZ_SEEDS_OUT set to fuzz/corpus; each input is joined in
//! the order of its target's file names (tests/fuzz_support).

mod common;
mod fuzz_support;
mod vdi_gen;
mod vhdx_gen;
mod vmdk_gen;

use common::*;
use fuzz_support::join;
use std::path::Path;

const KIB: usize = 1024;

fn save(out: &Path, target: &str, name: &str, files: &[&[u8]]) {
    let dir = out.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), join(files)).unwrap();
}

/// A 1 MiB monolithicSparse base from qemu-img with some data; returns it and its CID.
fn sparse_base(s: &Scratch, rng: &mut Rng) -> (Vec<u8>, u32) {
    let base = s.path("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "1M"]);
    write_random("vmdk", &base, rng, 0, 100 * KIB);
    let cid = vmfs_mount::chain::open_chain(&base, None, &ctx()).unwrap()[0]
        .identity()
        .cid
        .unwrap();
    (std::fs::read(&base).unwrap(), cid)
}

fn vmdk_seeds(out: &Path) {
    let s = Scratch::new("fuzz-seeds-vmdk");
    let mut rng = Rng::new(0x5eed);
    let (base, cid) = sparse_base(&s, &mut rng);
    let capacity = 2048u32; // sectors: the base's 1 MiB
    let grains: Vec<(u64, Vec<u8>)> = [0u64, 1, 5, 200]
        .iter()
        .map(|&g| (g, rng.bytes(KIB)))
        .collect();
    let cowd = vmdk_gen::cowd(capacity, 2, &grains);
    let ext = format!("RW {capacity} VMFSSPARSE \"top-s001.vmdk\"");
    let desc = vmdk_gen::descriptor("vmfsSparse", 0x77, Some((cid, "base.vmdk")), &[ext]);
    save(out, "vmdk", "cowd", &[desc.as_bytes(), &base, &cowd]);

    use vmdk_gen::SeGrain;
    let entries = vec![
        (0u64, SeGrain::Data(rng.bytes(4 * KIB))),
        (1, SeGrain::Data(rng.bytes(4 * KIB))),
        (3, SeGrain::Zero),
        (4, SeGrain::Unmapped),
        (100, SeGrain::Data(rng.bytes(4 * KIB))),
    ];
    let se = vmdk_gen::sesparse(u64::from(capacity), &[Some(0)], &entries);
    let ext = format!("RW {capacity} SESPARSE \"top-s001.vmdk\"");
    let desc = vmdk_gen::descriptor("seSparse", 0x78, Some((cid, "base.vmdk")), &[ext]);
    save(out, "vmdk", "sesparse", &[desc.as_bytes(), &base, &se]);
}

fn vdi_seeds(out: &Path) {
    let s = Scratch::new("fuzz-seeds-vdi");
    let mut rng = Rng::new(0x5eed + 1);
    let base = s.path("base.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", base.to_str().unwrap(), "3M"]);
    write_random("vdi", &base, &mut rng, 0, 300 * KIB);
    let blocks = vec![
        vdi_gen::Block::Data(rng.bytes(1 << 20)),
        vdi_gen::Block::Zero,
        vdi_gen::Block::Free,
    ];
    let mut spec = vdi_gen::Spec::child_of(&base, &mut rng, blocks);
    // The uuid the harness's file name says, in on-disk order.
    spec.uuid = [
        0x11, 0x11, 0x11, 0x11, 0x22, 0x22, 0x33, 0x33, 0x44, 0x44, 0x55, 0x55, 0x55, 0x55, 0x55,
        0x55,
    ];
    let child = s.path("child.vdi");
    spec.write(&child, &mut rng);
    let (child, base) = (
        std::fs::read(&child).unwrap(),
        std::fs::read(&base).unwrap(),
    );
    save(out, "vdi", "differencing", &[&child, &base]);
    save(out, "probe", "vdi-differencing", &[&child, &base]);
}

fn vhdx_seeds(out: &Path) {
    let mut rng = Rng::new(0x5eed + 2);
    let (img, _) = vhdx_gen::model::dirty_image(&mut rng);
    save(out, "vhdx", "dirty-log", &[&img]);
}

#[test]
#[ignore = "writes fuzz seeds; run by fuzz/seeds.sh"]
fn write_seeds() {
    let out = std::env::var_os("FUZZ_SEEDS_OUT").expect("FUZZ_SEEDS_OUT names the corpus dir");
    let out = Path::new(&out);
    vmdk_seeds(out);
    vdi_seeds(out);
    vhdx_seeds(out);
}
