//! VMDK pieces qemu-img cannot make, built from the spec: descriptor texts, ESX redo logs
//! (COWD / VMFSSPARSE) and ESXi seSparse extents. Shared by the hand-made VMDK tests and the
//! fuzz seed writer.
#![allow(dead_code)]

/// A descriptor file text; `parent` is (parentCID, parentFileNameHint).
pub fn descriptor(
    create_type: &str,
    cid: u32,
    parent: Option<(u32, &str)>,
    extents: &[String],
) -> String {
    let mut s = format!("# Disk DescriptorFile\nversion=1\nCID={cid:08x}\n");
    match parent {
        Some((pcid, hint)) => {
            s += &format!("parentCID={pcid:08x}\nparentFileNameHint=\"{hint}\"\n")
        }
        None => s += "parentCID=ffffffff\n",
    }
    s += &format!("createType=\"{create_type}\"\n\n# Extent description\n");
    for e in extents {
        s += e;
        s += "\n";
    }
    s + "\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"
}

pub fn put(buf: &mut Vec<u8>, off: usize, bytes: &[u8]) {
    if buf.len() < off + bytes.len() {
        buf.resize(off + bytes.len(), 0);
    }
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Builds a COWD redo log: `grains` maps grain index -> data (one grain each). GTs exist only
/// for the GD entries that hold grains; grains are stored in index order, so neighbours are
/// contiguous in the file.
pub fn cowd(capacity: u32, grain_sectors: u32, grains: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let gtes = 4096u64;
    let gd_entries = (capacity as u64).div_ceil(gtes * grain_sectors as u64);
    let mut f = vec![0u8; 2048];
    f[..4].copy_from_slice(b"COWD");
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    f[8..12].copy_from_slice(&3u32.to_le_bytes());
    f[12..16].copy_from_slice(&capacity.to_le_bytes());
    f[16..20].copy_from_slice(&grain_sectors.to_le_bytes());
    f[20..24].copy_from_slice(&4u32.to_le_bytes());
    f[24..28].copy_from_slice(&(gd_entries as u32).to_le_bytes());
    let gd_off = 2048usize;
    let mut next = (gd_off + gd_entries as usize * 4).div_ceil(512) * 512;
    put(&mut f, next - 1, &[0]);
    let mut gts = std::collections::BTreeMap::new();
    for (g, _) in grains {
        gts.entry(g / gtes).or_insert_with(|| {
            let at = next;
            next += gtes as usize * 4;
            at
        });
    }
    for (&i, &at) in &gts {
        put(
            &mut f,
            gd_off + i as usize * 4,
            &((at / 512) as u32).to_le_bytes(),
        );
        put(&mut f, at + gtes as usize * 4 - 1, &[0]);
    }
    let mut sorted = grains.to_vec();
    sorted.sort_by_key(|g| g.0);
    for (g, data) in sorted {
        let at = next;
        next += grain_sectors as usize * 512;
        put(&mut f, at, &data);
        put(
            &mut f,
            gts[&(g / gtes)] + (g % gtes) as usize * 4,
            &((at / 512) as u32).to_le_bytes(),
        );
    }
    f
}

/// Builds a seSparse extent of `capacity` sectors: `gts` lists, per GD index, the GT number
/// to use (None = unallocated); `entries` maps grain index -> entry kind.
pub enum SeGrain {
    Data(Vec<u8>),
    Zero,
    Unmapped,
}

pub fn sesparse(capacity: u64, gts: &[Option<u64>], entries: &[(u64, SeGrain)]) -> Vec<u8> {
    let (gd_sec, gt_sec) = (8u64, 16u64);
    let n_gts = gts.iter().flatten().max().map_or(0, |m| m + 1);
    let grains_sec = gt_sec + n_gts * 64;
    let mut f = vec![0u8; 512];
    let hdr = [
        0xcafe_babe,
        0x0000_0002_0000_0001,
        capacity,
        8,
        64,
        0,
        0,
        0,
        0,
        0,
        1,
        1,
        2,
        2,
        4,
        4,
        gd_sec,
        1,
        gt_sec,
        n_gts * 64,
        0,
        0,
        0,
        0,
        grains_sec,
        1 << 20,
    ];
    for (i, v) in hdr.iter().enumerate() {
        put(&mut f, i * 8, &u64::to_le_bytes(*v));
    }
    put(&mut f, 512, &0xcafe_cafeu64.to_le_bytes());
    for (i, gt) in gts.iter().enumerate() {
        if let Some(n) = gt {
            put(
                &mut f,
                (gd_sec * 512) as usize + i * 8,
                &(0x1000_0000_0000_0000u64 | n).to_le_bytes(),
            );
        }
    }
    put(&mut f, ((grains_sec) * 512) as usize - 1, &[0]);
    let mut next_grain = 0u64;
    for (g, kind) in entries {
        let gt = gts[(g / 4096) as usize].expect("grain in an allocated GT");
        let entry = match kind {
            SeGrain::Zero => 0x2000_0000_0000_0000u64,
            SeGrain::Unmapped => 0x1000_0000_0000_0000,
            SeGrain::Data(d) => {
                let idx = next_grain;
                next_grain += 1;
                put(&mut f, ((grains_sec + idx * 8) * 512) as usize, d);
                0x3000_0000_0000_0000 | ((idx & 0xfff) << 48) | (idx >> 12)
            }
        };
        put(
            &mut f,
            ((gt_sec + gt * 64) * 512 + (g % 4096) * 8) as usize,
            &entry.to_le_bytes(),
        );
    }
    f
}
