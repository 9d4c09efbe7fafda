//! The ONNX Runtime CPU engine on the real open_nsfw model.

mod common;

use gpu_executor::{Backends, Engine, ExecError, load};

fn engine(spec: &config::ModelSpec) -> Result<Box<dyn Engine>, ExecError> {
    load(spec, &Backends::new(common::ort_library()))
}

#[test]
fn batch_of_four_matches_four_single_runs() {
    let spec = common::open_nsfw();
    let mut e = engine(&spec).unwrap();
    assert_eq!(e.outputs(), 2);
    let samples: Vec<Vec<f32>> = (0..4).map(|k| common::sample(&spec, k)).collect();

    let singles: Vec<Vec<f32>> = samples.iter().map(|s| e.run(s, 1).unwrap()).collect();
    for out in &singles {
        assert_eq!(out.len(), 2);
        assert!(
            (out.iter().sum::<f32>() - 1.0).abs() < 1e-4,
            "{out:?} is not a distribution"
        );
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)), "{out:?}");
    }
    // The samples must actually differ, or the comparison below proves little.
    assert!((singles[0][1] - singles[1][1]).abs() > 1e-4, "{singles:?}");

    let batch: Vec<f32> = samples.concat();
    let out = e.run(&batch, 4).unwrap();
    assert_eq!(out.len(), 8);
    for (k, row) in out.chunks(2).enumerate() {
        assert!(
            (row.iter().sum::<f32>() - 1.0).abs() < 1e-4,
            "row {k}: {row:?}"
        );
        for (a, b) in row.iter().zip(&singles[k]) {
            assert!(
                (a - b).abs() < 1e-5,
                "row {k}: batch {row:?} vs single {:?}",
                singles[k]
            );
        }
    }
}

#[test]
fn wrong_input_name_is_a_clear_load_error() {
    let mut spec = common::open_nsfw();
    spec.input.name = "pixels".into();
    let err = engine(&spec).err().expect("must fail");
    assert!(matches!(err, ExecError::NoSuchInput { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("\"pixels\"") && msg.contains("input:0") && msg.contains("open_nsfw"),
        "{msg}"
    );
}

#[test]
fn wrong_output_name_or_label_count_is_a_clear_load_error() {
    let mut spec = common::open_nsfw();
    spec.output.name = "logits".into();
    let msg = engine(&spec).err().expect("must fail").to_string();
    assert!(
        msg.contains("\"logits\"") && msg.contains("outputs"),
        "{msg}"
    );

    let mut spec = common::open_nsfw();
    spec.output.labels.push("extra".into());
    let err = engine(&spec).err().expect("must fail");
    assert!(
        matches!(
            err,
            ExecError::OutputWidth {
                actual: 2,
                expected: 3,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn wrong_input_shape_is_a_clear_load_error() {
    let mut spec = common::open_nsfw();
    spec.input.layout = config::Layout::Nchw;
    let msg = engine(&spec).err().expect("must fail").to_string();
    assert!(
        msg.contains("[-1, 224, 224, 3]") && msg.contains("[-1, 3, 224, 224]"),
        "{msg}"
    );
}

#[test]
fn missing_model_file_names_the_path() {
    let mut spec = common::open_nsfw();
    spec.file = common::root()
        .join("no/such/model.onnx")
        .display()
        .to_string();
    let msg = engine(&spec).err().expect("must fail").to_string();
    assert!(
        msg.contains("no/such/model.onnx") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
fn wrong_input_length_is_refused_before_running() {
    let spec = common::open_nsfw();
    let mut e = engine(&spec).unwrap();
    let err = e.run(&[0.0; 10], 1).unwrap_err();
    assert!(
        matches!(
            err,
            ExecError::InputSize {
                expected: 150_528,
                actual: 10,
                ..
            }
        ),
        "{err:?}"
    );
}
