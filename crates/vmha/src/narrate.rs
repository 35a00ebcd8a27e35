//! Where the demos' narration goes, and their figures as JSON: narration is printed on stdout,
//! or on stderr once [`to_stderr`] was called (`vmha demo --json`, whose stdout carries only
//! the JSON summary).

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

static TO_STDERR: AtomicBool = AtomicBool::new(false);

/// From now on, narration goes to stderr (stdout is left to the JSON summary).
pub fn to_stderr() {
    TO_STDERR.store(true, Ordering::Relaxed);
}

/// Prints one line of narration (see [`say`]).
pub fn line(text: std::fmt::Arguments<'_>) {
    if TO_STDERR.load(Ordering::Relaxed) {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

/// `println!` for narration: on stdout, or on stderr after [`to_stderr`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::narrate::line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Figures (name, samples in ms, in the order measured) as JSON: one object per figure with
/// its `name`, `median_ms` (the upper median), `min_ms`, `max_ms` and `samples_ms`.
pub fn figures_json(figures: &[(String, Vec<u64>)]) -> Value {
    let figure = |(name, samples): &(String, Vec<u64>)| {
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        json!({
            "name": name,
            "median_ms": sorted.get(sorted.len() / 2),
            "min_ms": sorted.first(),
            "max_ms": sorted.last(),
            "samples_ms": samples,
        })
    };
    Value::Array(figures.iter().map(figure).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_have_their_median_bounds_and_samples() {
        let figures = vec![
            ("app kill → online".to_string(), vec![30, 10, 20]),
            ("one sample".to_string(), vec![7]),
            ("none yet".to_string(), vec![]),
        ];
        assert_eq!(
            figures_json(&figures),
            json!([
                {"name": "app kill → online", "median_ms": 20, "min_ms": 10, "max_ms": 30,
                 "samples_ms": [30, 10, 20]},
                {"name": "one sample", "median_ms": 7, "min_ms": 7, "max_ms": 7, "samples_ms": [7]},
                {"name": "none yet", "median_ms": null, "min_ms": null, "max_ms": null,
                 "samples_ms": []},
            ])
        );
    }
}
