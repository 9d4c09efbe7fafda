//! Property test: mutations of valid JPEG, PNG, GIF and WebP files
//! (truncation, byte flips, header dimensions changed) never panic or hang
//! the decoder, always end in an image or a documented client error within
//! the decode deadline, and never change the answer for a valid image
//! decoded next on the same thread.

use std::time::{Duration, Instant};

mod harness;

use config::Limits;
use harness::image;
use preprocess_worker::preprocess;
use proptest::prelude::*;
use shm::JobErrorKind;

const SOURCES: [&str; 5] = [
    "coffee.jpg",
    "chelsea_cmyk.jpg",
    "camera.png",
    "no_time_for_that_tiny.gif",
    "chelsea.webp",
];

/// How one file is damaged.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep the first `per_mille`‰ of the bytes.
    Truncate { per_mille: u16 },
    /// XOR bytes at these relative positions (‰ of the length) with `mask`.
    Flip { at: Vec<u16>, mask: u8 },
    /// Overwrite two bytes at a relative position in the first 64 bytes
    /// (where every one of these formats keeps its dimensions) with `v`.
    Header { offset: u8, v: u16 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0u16..1000).prop_map(|per_mille| Mutation::Truncate { per_mille }),
        (prop::collection::vec(0u16..1000, 1..16), 1u8..=255)
            .prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (0u8..64, any::<u16>()).prop_map(|(offset, v)| Mutation::Header { offset, v }),
    ]
}

fn apply(data: &[u8], m: &Mutation) -> Vec<u8> {
    let mut d = data.to_vec();
    let len = d.len();
    let at = |pm: u16| (len * usize::from(pm) / 1000).min(len.saturating_sub(1));
    match m {
        Mutation::Truncate { per_mille } => d.truncate(d.len() * usize::from(*per_mille) / 1000),
        Mutation::Flip {
            at: positions,
            mask,
        } => {
            for &p in positions {
                let i = at(p);
                d[i] ^= mask;
            }
        }
        Mutation::Header { offset, v } => {
            let i = usize::from(*offset).min(d.len().saturating_sub(2));
            d[i..i + 2].copy_from_slice(&v.to_be_bytes());
        }
    }
    d
}

/// Errors the API documents for a bad image (413, 415, 422).
fn documented(kind: JobErrorKind) -> bool {
    matches!(
        kind,
        JobErrorKind::Unsupported | JobErrorKind::TooLarge | JobErrorKind::Undecodable
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_images_end_in_a_result_or_a_documented_error_and_leave_no_state(
        source in 0usize..SOURCES.len(),
        m in mutation(),
    ) {
        let model = harness::model();
        let limits = Limits::default();
        let valid = image("coffee_640.jpg");
        let mut want = vec![0f32; model.input.elements()];
        preprocess(&valid, &model, &limits, Instant::now() + Duration::from_secs(30), &mut want)
            .unwrap();
        let bad = apply(&image(SOURCES[source]), &m);
        let deadline = Duration::from_millis(limits.decode_deadline_ms);
        let mut out = vec![0f32; model.input.elements()];
        let t = Instant::now();
        let r = preprocess(&bad, &model, &limits, t + deadline, &mut out);
        prop_assert!(t.elapsed() < deadline, "took {:?}", t.elapsed());
        if let Err(e) = &r {
            prop_assert!(documented(e.kind()), "undocumented error {:?}: {e}", e.kind());
        } else {
            prop_assert!(out.iter().all(|v| v.is_finite()));
        }
        // The next valid image on this thread decodes exactly as before.
        let mut again = vec![0f32; model.input.elements()];
        preprocess(&valid, &model, &limits, Instant::now() + Duration::from_secs(30), &mut again)
            .unwrap();
        prop_assert!(again == want, "a mutated {} changed the next image's tensor", SOURCES[source]);
    }
}
