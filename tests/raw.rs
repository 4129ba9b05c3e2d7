mod common;
use common::*;

#[test]
fn raw_image_reads_back_exactly() {
    let s = Scratch::new("raw");
    let img = s.path("disk.img");
    let data = Rng::new(7).bytes(3 * 1024 * 1024 + 1234);
    std::fs::write(&img, &data).unwrap();
    let view = open_view(&img).unwrap();
    let mut want = data.clone();
    want.resize(data.len().div_ceil(512) * 512, 0);
    assert_eq!(view.size(), want.len() as u64);
    assert_same("raw", &read_all(&view), &want);
    assert_eq!(view.next_data(0).unwrap(), Some(0));
}

#[test]
fn raw_size_is_rounded_up_to_sectors_like_qemu() {
    let s = Scratch::new("raw-odd");
    let img = s.path("odd.img");
    let data = Rng::new(8).bytes(1234);
    std::fs::write(&img, &data).unwrap();
    let view = open_view(&img).unwrap();
    let got = read_all(&view);
    assert_same("odd raw", &got, &qemu_raw(&img, Some("raw"), &[]));
    assert_eq!(got.len(), 1536);
}
