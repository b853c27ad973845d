//! Stopping a stage from outside without leaving half an artifact.
//!
//! The command line stops on SIGINT by exiting the process (see `cli`). A
//! host that outlives the stage (the Python module, on Ctrl-C) instead sets
//! the stage's [`Cancel`] flag; long loops check it between units of work
//! (a batch, a chunk, a document batch, a stage of `all`) and return
//! [`Error::Interrupted`]. Commits are never checkpoints, so an artifact is
//! either committed whole or not at all, and the next run resumes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// A flag shared by the host and the work it may stop; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the work to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Interrupted)` once cancelled: the work's checkpoint.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag() {
        let a = Cancel::new();
        let b = a.clone();
        assert!(a.check().is_ok());
        b.cancel();
        assert!(a.is_cancelled());
        assert!(matches!(a.check(), Err(Error::Interrupted)));
    }
}
