//! A writer for the "newc" cpio format the kernel unpacks as an initramfs. Archives may be
//! concatenated: the kernel unpacks one after another, later files replacing earlier ones.

#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    pub fn dir(&mut self, path: &str) {
        self.entry(path, 0o040755, &[], (0, 0));
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100000 | mode, data, (0, 0));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o120777, target.as_bytes(), (0, 0));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020600, &[], (major, minor));
    }

    /// The archive, closed with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = path.trim_start_matches('/');
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}
