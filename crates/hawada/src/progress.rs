//! Progress reporting without terminal code: the library calls an [`Observer`]; the CLI renders
//! it as progress bars.

/// Receives stage starts, positions and ends from long-running library calls.
pub trait Observer {
    /// A stage of `total` steps begins.
    fn begin(&self, stage: &str, total: u64);
    /// Position within the current stage, with a short status line (losses, latency).
    fn advance(&self, position: u64, message: &str);
    /// The current stage is over.
    fn end(&self);
}

/// Reports nothing (tests, library users without a terminal).
pub struct Silent;

impl Observer for Silent {
    fn begin(&self, _stage: &str, _total: u64) {}
    fn advance(&self, _position: u64, _message: &str) {}
    fn end(&self) {}
}
