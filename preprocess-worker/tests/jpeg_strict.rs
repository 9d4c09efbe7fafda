//! Hostile JPEGs: cut entropy data is refused (an appended EOI or a lying
//! SOF does not make it whole), only stray bytes between segments are
//! forgiven, and a broken JPEG never changes how the next image on the same
//! thread decodes.

use std::time::{Duration, Instant};

mod harness;

use config::Limits;
use harness::image;
use preprocess_worker::{PreprocessError, preprocess};
use shm::JobErrorKind;

fn run(data: &[u8]) -> Result<Vec<f32>, PreprocessError> {
    let model = harness::model();
    let mut out = vec![f32::NAN; model.input.elements()];
    let deadline = Instant::now() + Duration::from_secs(30);
    preprocess(data, &model, &Limits::default(), deadline, &mut out)?;
    Ok(out)
}

/// The tensor of `data` decoded on a thread that never decoded anything.
fn clean(data: &[u8]) -> Vec<f32> {
    let data = data.to_vec();
    std::thread::spawn(move || run(&data).unwrap())
        .join()
        .unwrap()
}

/// Offset of the first `FF xx` marker.
fn marker(data: &[u8], xx: u8) -> usize {
    data.windows(2)
        .position(|w| w == [0xFF, xx])
        .expect("marker present")
}

/// The first `keep` of the bytes, then an EOI.
fn cut_with_eoi(data: &[u8], keep: usize) -> Vec<u8> {
    let mut v = data[..keep].to_vec();
    v.extend_from_slice(&[0xFF, 0xD9]);
    v
}

/// Everything before the scan (tables, SOF), then an EOI.
fn header_only(data: &[u8]) -> Vec<u8> {
    cut_with_eoi(data, marker(data, 0xDA))
}

/// The SOF0/SOF2 frame header says `w`×`h` while the data is smaller.
fn sof_claims(data: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut v = data.to_vec();
    let sof = v
        .windows(2)
        .position(|m| m == [0xFF, 0xC0] || m == [0xFF, 0xC2])
        .expect("SOF");
    v[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    v[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    v
}

fn assert_undecodable(name: &str, data: &[u8]) {
    match run(data) {
        Err(e) => assert_eq!(e.kind(), JobErrorKind::Undecodable, "{name}: {e}"),
        Ok(_) => panic!("{name}: scored a cut JPEG as if it were whole"),
    }
}

#[test]
fn jpegs_whose_entropy_data_ends_early_are_refused_eoi_or_not() {
    let coffee = image("coffee_640.jpg");
    let sos = marker(&coffee, 0xDA);
    let half = sos + (coffee.len() - sos) / 2;
    assert_undecodable("cut in half + EOI", &cut_with_eoi(&coffee, half));
    assert_undecodable(
        "cut near the end + EOI",
        &cut_with_eoi(&coffee, coffee.len() - 200),
    );
    assert_undecodable("cut in half, no EOI", &coffee[..half]);
    assert_undecodable("header only + EOI", &header_only(&coffee));
    let big = image("coffee.jpg");
    assert_undecodable(
        "600x400 data, SOF says 6000x6000",
        &sof_claims(&big, 6000, 6000),
    );
    // Progressive JPEGs too (astronaut_1536 is baseline; chelsea_cmyk is
    // another decoder path: CMYK).
    let cmyk = image("chelsea_cmyk.jpg");
    let sos = marker(&cmyk, 0xDA);
    assert_undecodable(
        "CMYK cut + EOI",
        &cut_with_eoi(&cmyk, sos + (cmyk.len() - sos) / 2),
    );
}

#[test]
fn stray_bytes_before_a_marker_are_forgiven_and_change_nothing() {
    let coffee = image("coffee_640.jpg");
    let eoi = coffee.len() - 2;
    assert_eq!(&coffee[eoi..], [0xFF, 0xD9]);
    let mut stray = coffee[..eoi].to_vec();
    stray.extend_from_slice(&[0x00, 0x13, 0x37, 0xFF, 0xD9]);
    let got = run(&stray).expect("3 extraneous bytes before EOI are harmless");
    assert_eq!(got, clean(&coffee), "the stray bytes changed the pixels");
}

/// The sequence of the finding: a JPEG decoded with DCT scaling, then one
/// whose header parses but whose scan is missing, then a valid JPEG, all on
/// one thread: the valid one must decode exactly as on a fresh thread.
#[test]
fn a_broken_jpeg_never_changes_the_next_images_answer_on_the_same_thread() {
    let big = image("astronaut_1536.jpg");
    let valid = image("coffee_640.jpg");
    let broken = [
        header_only(&image("coffee.jpg")),
        cut_with_eoi(&big, big.len() / 2),
        sof_claims(&image("coffee.jpg"), 6000, 6000),
        b"\xFF\xD8\xFF\xE0garbage".to_vec(),
    ];
    let want_valid = clean(&valid);
    let want_big = clean(&big);
    std::thread::spawn(move || {
        for b in &broken {
            run(&big).expect("the DCT-scaled JPEG decodes");
            assert!(run(b).is_err(), "a broken JPEG decoded");
            assert_eq!(
                run(&valid).unwrap(),
                want_valid,
                "the next valid JPEG changed"
            );
            assert!(run(b).is_err());
            assert_eq!(
                run(&big).unwrap(),
                want_big,
                "the next DCT-scaled JPEG changed"
            );
        }
    })
    .join()
    .unwrap();
}
