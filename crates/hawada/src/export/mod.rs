//! Export: gates → keep-set → physically smaller model on disk.

pub mod search;
pub mod slice;
