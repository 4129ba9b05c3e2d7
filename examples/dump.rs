//! Debug aid: writes a view of an image to stdout as raw bytes, through the library (no FUSE).
//!   cargo run --example dump -- IMAGE [VIEW]     (VIEW: a name under snapshots/; default live)
//!   cargo run --example dump -- IMAGE --names    (lists the views)

use std::io::Write;
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::format::OpenCtx;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(image) = args.get(1) else {
        eprintln!("usage: dump IMAGE [VIEW|--names]");
        std::process::exit(2);
    };
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(64 << 20)), false);
    let layers = match vmfs_mount::chain::open_chain(std::path::Path::new(image), None, &ctx) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dump: {e}");
            std::process::exit(1);
        }
    };
    let (live, snaps) = vmfs_mount::plan::plan(&layers).unwrap_or_else(|e| {
        eprintln!("dump: {e}");
        std::process::exit(1)
    });
    if args.get(2).map(String::as_str) == Some("--names") {
        for s in &snaps {
            println!("{}\t{}", s.name, s.size);
        }
        return;
    }
    let spec = match args.get(2) {
        None => live,
        Some(name) => snaps
            .into_iter()
            .find(|s| &s.name == name)
            .unwrap_or_else(|| {
                eprintln!("dump: no view {name}");
                std::process::exit(1)
            }),
    };
    let view = vmfs_mount::view::View::new(
        spec.layers,
        spec.size,
        Arc::new(ByteCache::new(8 << 20)),
        4096,
    );
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < view.size() {
        let n = view.read(off, &mut buf).unwrap_or_else(|e| {
            eprintln!("dump: read at {off:#x}: {e}");
            std::process::exit(1)
        });
        out.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
}
