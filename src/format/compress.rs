//! Decompression of compressed clusters and grains, with bounded output.

use super::Codec;
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Decompresses `input` into exactly `out_len` bytes. Input may carry trailing garbage
/// (qcow2 rounds the stored length up to sectors); output shorter than `out_len` is corrupt.
pub fn decompress(
    codec: Codec,
    input: &[u8],
    out_len: usize,
    file: &Path,
    off: u64,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; out_len];
    let got = match codec {
        Codec::Deflate => fill(flate2::read::DeflateDecoder::new(input), &mut out),
        Codec::Zlib => fill(flate2::read::ZlibDecoder::new(input), &mut out),
        Codec::Zstd => zstd_fill(input, &mut out),
    };
    match got {
        Ok(n) if n == out_len => Ok(out),
        Ok(n) => Err(Error::corrupt(
            file,
            "compressed cluster",
            off,
            format!("decompresses to {n} bytes, expected {out_len}"),
        )),
        Err(e) => Err(Error::corrupt(
            file,
            "compressed cluster",
            off,
            format!("cannot decompress: {e}"),
        )),
    }
}

fn fill(mut r: impl Read, out: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < out.len() {
        match r.read(&mut out[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if n > 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// qcow2 zstd clusters may be followed by padding, so decode frame by frame until full.
fn zstd_fill(input: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    let mut dec = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
    fill(&mut dec, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 13) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut z = enc.finish().unwrap();
        z.extend_from_slice(&[0xff; 100]); // sector padding
        let p = Path::new("t");
        assert_eq!(decompress(Codec::Deflate, &z, 4096, p, 0).unwrap(), data);
        let zs = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(decompress(Codec::Zstd, &zs, 4096, p, 0).unwrap(), data);
        assert!(decompress(Codec::Deflate, &[1, 2, 3, 4], 4096, p, 0).is_err());
        assert!(decompress(Codec::Zstd, &[1, 2, 3, 4], 4096, p, 0).is_err());
        assert!(decompress(Codec::Deflate, &z, 8192, p, 0).is_err());
    }
}
