//! Progress bars on a terminal (indicatif on stderr, which draws nothing when stderr is not a
//! terminal, so scripts and logs get no bar).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use edgellm::models::fetch;

/// A bar counting `total` items of `unit` ("positions", "tensors", "runs").
pub fn counter(message: &str, total: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}}, {{eta}} left)"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A bar counting bytes, for downloads and checksums.
fn bytes(message: &str, total: Option<u64>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta} left)"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Reports a model fetch with one byte bar per stage.
#[derive(Default)]
pub struct FetchBars {
    bar: Option<ProgressBar>,
}

impl fetch::Progress for FetchBars {
    fn stage(&mut self, what: &str, total: Option<u64>) {
        self.finish();
        self.bar = Some(bytes(what, total));
    }

    fn advance(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A byte bar for hashing one file.
pub fn hashing(message: &str, total: u64) -> ProgressBar {
    bytes(message, Some(total))
}
