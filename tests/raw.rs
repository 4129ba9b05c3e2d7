mod common;
use common::*;

#[test]
fn raw_image_reads_back_exactly() {
    let s = Scratch::new("raw");
    let img = s.path("disk.img");
    let data = Rng::new(7).bytes(3 * 1024 * 1024 + 1234);
    std::fs::write(&img, &data).unwrap();
    let view = open_view(&img).unwrap();
    assert_eq!(view.size(), data.len() as u64);
    assert_same("raw", &read_all(&view), &data);
    assert_eq!(view.next_data(0).unwrap(), Some(0));
}
