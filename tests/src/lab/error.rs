//! What can go wrong in the lab: a command that failed, an I/O operation, a state not reached.

/// A lab failure.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command exited with failure; what it printed on stderr.
    #[error("{command}: {stderr}")]
    Command { command: String, stderr: String },
    /// A system call or file operation failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The lab did not reach a state in time (what, and what it showed instead).
    #[error("{0}")]
    NotReached(String),
    /// No node of that name runs.
    #[error("no node {0} runs in the lab")]
    NoSuchNode(String),
    /// A tool's report lacks a field the lab reads.
    #[error("iperf3's report lacks {0}")]
    Report(String),
    #[error("{0} is not an address")]
    Address(String),
}

pub type Result<T> = std::result::Result<T, LabError>;

/// Wraps an I/O error with what was being done.
pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}
