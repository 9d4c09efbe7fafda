//! Fuzz target `decode`: each input goes through the whole image pipeline
//! (`preprocess_worker::preprocess`: sniff, header limits, decode, orient,
//! resize, normalise) with the default model (open_nsfw) and
//! `Limits::default()`, as the worker runs it. The target panics, which
//! afl.rs turns into an abort that AFL++ records as a crash, when the answer
//! breaks the API's contract:
//! - an error whose kind is not one the API documents for a bad image
//!   (Unsupported 415, TooLarge 413, Undecodable 422);
//! - the decode deadline (`limits.decode_deadline_ms`) passed;
//! - a tensor with a value that is not finite (or was never written);
//! - a fixed valid JPEG decoded next on the same thread gives a tensor that
//!   is not bit-identical to the one computed at start (state leaked from
//!   one request into the next).
//!
//! Environment (read once at start):
//! - `MMGATE_FUZZ_DEADLINE_FACTOR` (default 1): multiplies the deadline, for
//!   slow (instrumented, debug-assertion) builds.
//! - `MMGATE_FUZZ_STRICT_PANICS=1`: every panic aborts, including a decoder
//!   panic that `preprocess` contains and answers as Undecodable, as the
//!   service does; use it to find decoder bugs that never reach a client.
//!
//! Outside AFL++ the binary reads one input from stdin and checks it, which
//! is how a crash is reproduced: `decode < crash-file`. `decode
//! --deadline-ms` prints the deadline it enforces, in milliseconds.

use std::time::{Duration, Instant};

use config::{Limits, ModelSpec};
use preprocess_worker::preprocess;
use shm::JobErrorKind;

/// A valid photo decoded after every input; its tensor must never change.
const CANARY: &[u8] = include_bytes!("../../tests/fixtures/images/coffee_640.jpg");

/// The default model's spec, loaded as the worker tests load it.
const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../configs/models/open_nsfw.toml"
);

/// Written into the output before each call, so an element `preprocess`
/// left unwritten (the previous request's data, in a shared slot) shows up
/// as not finite.
const UNWRITTEN: f32 = f32::NAN;

struct Harness {
    model: ModelSpec,
    limits: Limits,
    deadline: Duration,
    /// The canary's tensor, computed once at start.
    want: Vec<f32>,
    out: Vec<f32>,
}

/// Errors the API documents for a bad image (415, 413, 422).
fn documented(kind: JobErrorKind) -> bool {
    matches!(
        kind,
        JobErrorKind::Unsupported | JobErrorKind::TooLarge | JobErrorKind::Undecodable
    )
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn deadline_factor() -> f64 {
    let name = "MMGATE_FUZZ_DEADLINE_FACTOR";
    match std::env::var(name) {
        Err(_) => 1.0,
        Ok(v) => match v.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => f,
            _ => panic!("{name} is {v:?}; it must be a positive number"),
        },
    }
}

impl Harness {
    fn new() -> Self {
        let model = ModelSpec::load(std::path::Path::new(MODEL))
            .unwrap_or_else(|e| panic!("loading {MODEL}: {e}"));
        let limits = Limits::default();
        let deadline = Duration::from_millis(limits.decode_deadline_ms).mul_f64(deadline_factor());
        let elements = model.input.elements();
        let mut h = Harness {
            model,
            limits,
            deadline,
            want: vec![UNWRITTEN; elements],
            out: vec![UNWRITTEN; elements],
        };
        let far = Instant::now() + Duration::from_secs(3600);
        preprocess(CANARY, &h.model, &h.limits, far, &mut h.want)
            .expect("the canary JPEG (coffee_640.jpg) must decode");
        assert_finite(&h.want, "the canary JPEG (coffee_640.jpg)");
        h
    }

    /// One fuzz input, then the canary.
    fn check(&mut self, data: &[u8]) {
        self.out.fill(UNWRITTEN);
        let t = Instant::now();
        let r = preprocess(
            data,
            &self.model,
            &self.limits,
            t + self.deadline,
            &mut self.out,
        );
        let took = t.elapsed();
        match &r {
            Err(e) if e.kind() == JobErrorKind::Deadline => {
                panic!("deadline: took {took:?}, over {:?}: {e}", self.deadline)
            }
            Err(e) => assert!(
                documented(e.kind()),
                "undocumented error kind {:?}: {e}",
                e.kind()
            ),
            Ok(info) => assert_finite(&self.out, &format!("the input ({info:?})")),
        }
        assert!(
            took <= self.deadline,
            "deadline: took {took:?}, over {:?}, and answered {r:?}",
            self.deadline
        );
        self.canary(&r);
    }

    /// The canary decodes to exactly the tensor it had at start.
    fn canary(
        &mut self,
        after: &Result<preprocess_worker::ImageInfo, preprocess_worker::PreprocessError>,
    ) {
        self.out.fill(UNWRITTEN);
        let far = Instant::now() + Duration::from_secs(3600);
        if let Err(e) = preprocess(CANARY, &self.model, &self.limits, far, &mut self.out) {
            panic!(
                "state leak: the canary JPEG failed ({e}) after an input that answered {after:?}"
            );
        }
        let diff = self
            .want
            .iter()
            .zip(&self.out)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = diff {
            panic!(
                "state leak: the canary JPEG's tensor changed at element {i} ({} -> {}) \
                 after an input that answered {after:?}",
                self.want[i], self.out[i]
            );
        }
    }
}

fn assert_finite(tensor: &[f32], what: &str) {
    if let Some(i) = tensor.iter().position(|v| !v.is_finite()) {
        panic!(
            "non-finite tensor: element {i} of {} is {} for {what}",
            tensor.len(),
            tensor[i]
        );
    }
}

fn main() {
    let mut harness = Harness::new();
    // For scripts/fuzz.sh: the deadline this harness enforces.
    if std::env::args().nth(1).as_deref() == Some("--deadline-ms") {
        println!("{}", harness.deadline.as_millis());
        return;
    }
    let strict = env_flag("MMGATE_FUZZ_STRICT_PANICS");
    afl::fuzz(strict, |data: &[u8]| harness.check(data));
}
