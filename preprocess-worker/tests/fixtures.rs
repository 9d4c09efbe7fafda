//! The pipeline on the repository's fixtures: every bad input gets the right
//! error kind without a full decode, every good one the right size and
//! orientation, and the layouts and letterbox land pixels where they belong.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use config::{Layout, Limits, ModelSpec, ResizeMode, Size};
use preprocess_worker::{ImageInfo, PreprocessError, preprocess};
use shm::JobErrorKind;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn open_nsfw() -> ModelSpec {
    ModelSpec::load(&root().join("configs/models/open_nsfw.toml")).unwrap()
}

fn fixture(dir: &str, name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures").join(dir).join(name)).unwrap()
}

fn run(data: &[u8], model: &ModelSpec) -> Result<(ImageInfo, Vec<f32>), PreprocessError> {
    let mut out = vec![f32::NAN; model.input.elements()];
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = preprocess(data, model, &Limits::default(), deadline, &mut out)?;
    Ok((info, out))
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

#[test]
fn bad_inputs_get_the_right_error_kind_without_decoding() {
    let model = open_nsfw();
    let cases = [
        ("empty.bin", JobErrorKind::Unsupported),
        ("random.bin", JobErrorKind::Unsupported),
        ("text.txt", JobErrorKind::Unsupported),
        ("truncated.jpg", JobErrorKind::Undecodable),
        ("claims_65000.jpg", JobErrorKind::TooLarge),
        ("bomb_30000.png", JobErrorKind::TooLarge),
    ];
    for (name, kind) in cases {
        let data = fixture("bad", name);
        let t = Instant::now();
        let err = run(&data, &model).expect_err(name);
        // A full decode of the bombs would take far longer (and gigabytes).
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{name} took {:?}",
            t.elapsed()
        );
        assert_eq!(err.kind(), kind, "{name}: {err}");
    }
    let err = run(&fixture("bad", "bomb_30000.png"), &model).unwrap_err();
    assert_eq!(
        err.to_string(),
        "image is 30000×30000 pixels (900.0 megapixels); the limit is 40 megapixels"
    );
}

#[test]
fn good_fixtures_decode_at_their_displayed_size() {
    let model = open_nsfw();
    let cases = [
        ("astronaut_1536.jpg", 1536, 1536, "jpeg"),
        ("astronaut_16bit.png", 256, 256, "png"),
        ("camera.png", 512, 512, "png"),
        ("camera_gray16.png", 256, 256, "png"),
        ("chelsea.png", 451, 300, "png"),
        ("chelsea.webp", 451, 300, "webp"),
        ("chelsea_cmyk.jpg", 451, 300, "jpeg"),
        ("coffee.bmp", 300, 200, "bmp"),
        ("coffee.jpg", 600, 400, "jpeg"),
        ("coffee_640.jpg", 640, 480, "jpeg"),
        ("coffee_exif6.jpg", 600, 400, "jpeg"),
        ("logo.png", 500, 500, "png"),
        ("no_time_for_that_tiny.gif", 14, 25, "gif"),
    ];
    for (name, w, h, format) in cases {
        let (info, out) = run(&fixture("images", name), &model).expect(name);
        assert_eq!(
            (info.width, info.height, info.format),
            (w, h, format),
            "{name}"
        );
        assert!(out.iter().all(|v| (-123.0..=151.0).contains(v)), "{name}");
    }
}

#[test]
fn exif_orientation_is_applied() {
    let model = open_nsfw();
    let (_, upright) = run(&fixture("images", "coffee.jpg"), &model).unwrap();
    let (_, rotated) = run(&fixture("images", "coffee_exif6.jpg"), &model).unwrap();
    let (_, other) = run(&fixture("images", "chelsea.png"), &model).unwrap();
    // Same photo (re-encoded): close; a different photo: far.
    let same = mean_abs_diff(&upright, &rotated);
    assert!(same < 3.0, "coffee vs coffee_exif6: {same}");
    assert!(mean_abs_diff(&upright, &other) > 10.0 * same);
}

#[test]
fn same_pixels_in_16_and_8_bit_and_in_every_container() {
    let model = open_nsfw();
    let (_, png) = run(&fixture("images", "chelsea.png"), &model).unwrap();
    let (_, webp) = run(&fixture("images", "chelsea.webp"), &model).unwrap();
    assert_eq!(png, webp);
}

#[test]
fn nchw_holds_the_nhwc_values_transposed() {
    let nhwc = open_nsfw();
    let mut nchw = nhwc.clone();
    nchw.input.layout = Layout::Nchw;
    let data = fixture("images", "chelsea.png");
    let (_, a) = run(&data, &nhwc).unwrap();
    let (_, b) = run(&data, &nchw).unwrap();
    let (h, w) = (224, 224);
    for y in [0, 17, 223] {
        for x in [0, 100, 223] {
            for c in 0..3 {
                assert_eq!(a[(y * w + x) * 3 + c], b[c * h * w + y * w + x]);
            }
        }
    }
}

#[test]
fn letterbox_pads_above_and_below_a_wide_image() {
    let mut model = open_nsfw();
    model.preprocess.resize_mode = ResizeMode::Letterbox;
    model.preprocess.resize = Size {
        width: 224,
        height: 224,
    };
    model.preprocess.crop = None;
    model.preprocess.pad_value = 0;
    // coffee is 600×400: 224×149 inside 224×224, 37 padding rows on top.
    let (_, out) = run(&fixture("images", "coffee.jpg"), &model).unwrap();
    let pad = [-104.0, -117.0, -123.0];
    let row = |y: usize| &out[y * 224 * 3..(y + 1) * 224 * 3];
    for y in (0..37).chain(186..224) {
        assert!(
            row(y).chunks(3).all(|p| p == pad),
            "row {y} should be padding"
        );
    }
    for y in [37, 100, 185] {
        assert!(
            row(y).chunks(3).any(|p| p != pad),
            "row {y} should be image"
        );
    }
}

#[test]
fn deadline_and_output_size_are_enforced() {
    let model = open_nsfw();
    let data = fixture("images", "coffee.jpg");
    let mut out = vec![0f32; model.input.elements()];
    let past = Instant::now() - Duration::from_millis(1);
    let err = preprocess(&data, &model, &Limits::default(), past, &mut out).unwrap_err();
    assert_eq!(err.kind(), JobErrorKind::Deadline);
    let mut short = vec![0f32; 10];
    let later = Instant::now() + Duration::from_secs(10);
    let err = preprocess(&data, &model, &Limits::default(), later, &mut short).unwrap_err();
    assert_eq!(err.kind(), JobErrorKind::Internal);
    let tight = Limits {
        max_body_bytes: 1000,
        ..Limits::default()
    };
    let err = preprocess(&data, &model, &tight, later, &mut out).unwrap_err();
    assert_eq!(err.kind(), JobErrorKind::TooLarge);
}

#[test]
fn dct_scaling_stays_close_to_the_full_decode() {
    let on = open_nsfw();
    let mut off = on.clone();
    off.preprocess.jpeg_dct_scaling = false;
    let data = fixture("images", "astronaut_1536.jpg");
    let (_, a) = run(&data, &on).unwrap();
    let (_, b) = run(&data, &off).unwrap();
    let d = mean_abs_diff(&a, &b);
    assert!(d > 0.0 && d < 1.0, "mean abs diff {d}");
}

/// `limits.max_decode_bytes` refuses a decode from its header, before the
/// raster is allocated, at exactly its raster size: 16-bit samples count
/// twice, a JPEG is charged at its DCT-scaled size.
#[test]
fn decode_memory_is_capped_from_the_header() {
    let model = open_nsfw();
    let run_with = |name: &str, max_decode_bytes: u64| {
        let limits = Limits {
            max_decode_bytes,
            ..Limits::default()
        };
        let mut out = vec![0f32; model.input.elements()];
        let deadline = Instant::now() + Duration::from_secs(30);
        preprocess(
            &fixture("images", name),
            &model,
            &limits,
            deadline,
            &mut out,
        )
    };
    for (name, raster) in [
        ("astronaut_16bit.png", 256 * 256 * 3 * 2),
        ("coffee.jpg", 600 * 400 * 3),
        ("astronaut_1536.jpg", 768 * 768 * 3),
    ] {
        let err = run_with(name, raster - 1).unwrap_err();
        assert_eq!(err.kind(), JobErrorKind::TooLarge, "{name}: {err}");
        assert!(
            err.to_string().contains("max_decode_bytes"),
            "{name}: {err}"
        );
        run_with(name, raster + 4096).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// A progressive JPEG makes libjpeg hold every DCT coefficient of the whole
/// image (2 bytes per coefficient) until its last scan, however small the
/// DCT-scaled output: the cap counts that buffer, so a progressive file is
/// refused where the same picture, sequential, fits.
#[test]
fn a_progressive_jpeg_is_charged_for_its_coefficient_buffer() {
    use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};
    let model = open_nsfw();
    let rgb = image::load_from_memory(&fixture("images", "astronaut_1536.jpg"))
        .unwrap()
        .to_rgb8();
    let encode = |progressive: bool| {
        let mut c = Compressor::new().unwrap();
        c.set_subsamp(Subsamp::None).unwrap();
        c.set_quality(90).unwrap();
        c.set_progressive(progressive).unwrap();
        let img = Image {
            pixels: rgb.as_raw().as_slice(),
            width: 1536,
            pitch: 1536 * 3,
            height: 1536,
            format: PixelFormat::RGB,
        };
        c.compress_to_vec(img).unwrap()
    };
    let run = |data: &[u8], max_decode_bytes: u64| {
        let limits = Limits {
            max_decode_bytes,
            ..Limits::default()
        };
        let mut out = vec![0f32; model.input.elements()];
        preprocess(
            data,
            &model,
            &limits,
            Instant::now() + Duration::from_secs(30),
            &mut out,
        )
    };
    // DCT-scaled to 768², the output raster is 1.7 MiB; the coefficients
    // of 1536² at 4:4:4 are 96² MCUs × 12 blocks × 128 bytes = 13.5 MiB.
    let raster = 768 * 768 * 3;
    let coefficients = 96 * 96 * 12 * 128;
    let (sequential, progressive) = (encode(false), encode(true));
    run(&sequential, raster + 4096).expect("a sequential JPEG needs its raster only");
    let err = run(&progressive, raster + 4096).unwrap_err();
    assert_eq!(err.kind(), JobErrorKind::TooLarge, "{err}");
    assert!(err.to_string().contains("max_decode_bytes"), "{err}");
    run(&progressive, raster + coefficients + 4096).expect("fits with its coefficients");
    let err = run(&progressive, raster + coefficients - 1).unwrap_err();
    assert_eq!(err.kind(), JobErrorKind::TooLarge, "{err}");
}

/// A model with `slot_dtype = "uint8"` gets the window's pixels from the
/// worker and the executor normalises them with `normalize_rgb8`: on every
/// photo, in both layouts and channel orders, and with letterbox padding,
/// that gives the float path's tensor bit for bit. (The float path is the
/// same two steps, so this checks the uint8 route through `preprocess`;
/// `normalize_rgb8` itself is checked against the plain formula in
/// `normalize.rs`, and the scores against the reference in the gateway's
/// `gpu_backends` test.)
#[test]
fn uint8_pixels_normalised_later_equal_the_float_tensor_bit_for_bit() {
    let dir = root().join("tests/fixtures/images");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let base = open_nsfw();
    let mut nchw_rgb_letterbox = base.clone();
    nchw_rgb_letterbox.input.layout = Layout::Nchw;
    nchw_rgb_letterbox.preprocess.color_order = config::ColorOrder::Rgb;
    nchw_rgb_letterbox.preprocess.resize_mode = ResizeMode::Letterbox;
    nchw_rgb_letterbox.preprocess.crop = None;
    nchw_rgb_letterbox.preprocess.resize = Size {
        width: 224,
        height: 224,
    };
    nchw_rgb_letterbox.preprocess.pad_value = 114;
    nchw_rgb_letterbox.preprocess.scale = 1.0 / 255.0;
    nchw_rgb_letterbox.preprocess.mean = [0.485, 0.456, 0.406];
    nchw_rgb_letterbox.preprocess.std = [0.229, 0.224, 0.225];
    let mut compared = 0;
    for model in [&base, &nchw_rgb_letterbox] {
        model.validate().unwrap();
        for name in &names {
            let data = std::fs::read(dir.join(name)).unwrap();
            let Ok((_, want)) = run(&data, model) else {
                continue;
            };
            let mut pixels = vec![0u8; model.input.elements()];
            let deadline = Instant::now() + Duration::from_secs(30);
            preprocess(&data, model, &Limits::default(), deadline, &mut pixels).unwrap();
            let mut got = vec![f32::NAN; model.input.elements()];
            preprocess_worker::normalize_rgb8(&pixels, &model.input, &model.preprocess, &mut got);
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{name} ({:?}): the two paths differ",
                model.input.layout
            );
            compared += 1;
        }
    }
    assert!(compared >= 12, "only {compared} photos compared");
}
