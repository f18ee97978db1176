//! indicatif bars for the library's `Observer`: one bar per stage, with rate and ETA.

use indicatif::{ProgressBar, ProgressStyle};
use std::cell::RefCell;

#[derive(Default)]
pub struct Bars {
    bar: RefCell<Option<ProgressBar>>,
}

impl hawada::progress::Observer for Bars {
    fn begin(&self, stage: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
            )
            .expect("progress template is valid")
            .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        *self.bar.borrow_mut() = Some(bar);
    }

    fn advance(&self, position: u64, message: &str) {
        if let Some(bar) = self.bar.borrow().as_ref() {
            bar.set_position(position);
            bar.set_message(message.to_string());
        }
    }

    fn end(&self) {
        if let Some(bar) = self.bar.borrow_mut().take() {
            bar.finish();
        }
    }
}
