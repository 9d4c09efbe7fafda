//! Turns a model's raw outputs into the scores the API returns, per
//! `output.postprocess`: as given, softmax over a sample's values, or an
//! independent sigmoid per value.

use config::Postprocess;

/// Applies `kind` in place to the values of one sample.
pub fn apply(kind: Postprocess, values: &mut [f32]) {
    match kind {
        Postprocess::None => {}
        Postprocess::Softmax => softmax(values),
        Postprocess::Sigmoid => values.iter_mut().for_each(|v| *v = sigmoid(*v)),
    }
}

/// Numerically stable softmax: the maximum is subtracted before `exp`, so
/// large logits neither overflow nor turn into NaN.
pub fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // All -inf (or NaN present): nothing meaningful to normalise.
        if max == f32::NEG_INFINITY {
            let n = values.len() as f32;
            values.iter_mut().for_each(|v| *v = 1.0 / n);
        }
        return;
    }
    let mut sum = 0.0f32;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    values.iter_mut().for_each(|v| *v /= sum);
}

/// Logistic function, written to avoid `exp` overflow for large |x|.
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn none_leaves_values_alone() {
        let mut v = [3.0, -1.0, 0.5];
        apply(Postprocess::None, &mut v);
        assert_eq!(v, [3.0, -1.0, 0.5]);
    }

    #[test]
    fn softmax_matches_the_textbook_formula_and_sums_to_one() {
        let mut v = [1.0f32, 2.0, 3.0];
        apply(Postprocess::Softmax, &mut v);
        let e: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let s: f32 = e.iter().sum();
        let want: Vec<f32> = e.iter().map(|x| x / s).collect();
        assert!(close(&v, &want), "{v:?} vs {want:?}");
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_is_stable_for_huge_logits() {
        let mut v = [1000.0f32, 1000.0, -1000.0];
        softmax(&mut v);
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        assert!(close(&v, &[0.5, 0.5, 0.0]), "{v:?}");
        let mut v = [f32::NEG_INFINITY, 0.0];
        softmax(&mut v);
        assert!(close(&v, &[0.0, 1.0]), "{v:?}");
    }

    #[test]
    fn softmax_of_a_single_value_is_one() {
        let mut v = [-42.0f32];
        softmax(&mut v);
        assert_eq!(v, [1.0]);
    }

    #[test]
    fn sigmoid_is_independent_per_value_and_saturates_without_nan() {
        let mut v = [0.0f32, 2.0, -2.0, 100.0, -100.0];
        apply(Postprocess::Sigmoid, &mut v);
        let s2 = 1.0 / (1.0 + (-2.0f32).exp());
        assert!(close(&v, &[0.5, s2, 1.0 - s2, 1.0, 0.0]), "{v:?}");
        assert!(v.iter().all(|x| x.is_finite()));
    }
}
