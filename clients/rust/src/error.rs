//! The SDK's typed errors: what went wrong, and whether retrying could help.

use tonic::Code;

/// Everything a [`crate::Client`] or [`crate::IngestSession`] can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint URL cannot be used (not a valid URI).
    #[error("invalid endpoint {url:?}")]
    InvalidEndpoint {
        /// The URL as given.
        url: String,
        /// Why tonic refused it.
        #[source]
        source: tonic::transport::Error,
    },
    /// No connection could be established.
    #[error("cannot connect to {url}")]
    Connect {
        /// The endpoint.
        url: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered an RPC with a non-OK status.
    #[error("rpc failed: {code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// `Analyze` for a device the server has no state for.
    #[error("device {device_id:?} is unknown to the server")]
    NotFound {
        /// The device asked for.
        device_id: String,
    },
    /// The server broke the Ingest contract (one response per request, one verdict per
    /// sample, in order); the session cannot match verdicts to samples any more.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The broken Ingest stream could not be re-established within the configured
    /// number of attempts; `unanswered` samples were never answered.
    #[error(
        "gave up after {attempts} reconnect attempts with {unanswered} samples unanswered: {last}"
    )]
    ReconnectExhausted {
        /// Attempts made.
        attempts: u32,
        /// Samples sent or queued but not answered.
        unanswered: usize,
        /// The last error seen.
        last: Box<Error>,
    },
    /// The server ended the session with a status that retrying cannot fix (for example
    /// `INVALID_ARGUMENT` for a request over the sample limit); `unanswered` samples
    /// were never answered.
    #[error("ingest session failed with {unanswered} samples unanswered: {source}")]
    SessionFailed {
        /// Samples sent or queued but not answered.
        unanswered: usize,
        /// The status that ended it.
        #[source]
        source: Box<Error>,
    },
    /// The session is closed: it failed earlier or [`crate::IngestSession::close`] ran.
    #[error("ingest session is closed")]
    Closed,
}

impl Error {
    /// The gRPC code, when the error is a status from the server.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            Error::NotFound { .. } => Some(Code::NotFound),
            _ => None,
        }
    }

    /// Whether re-opening the stream and re-sending can succeed: the server going away
    /// (`UNAVAILABLE` at shutdown or at the stream lifetime limit), a connection reset,
    /// a refused connection, overload, an idle timeout.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } => true,
            Error::Status { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::Aborted
                    | Code::Internal
                    | Code::ResourceExhausted
                    | Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_codes() {
        assert!(Error::from(tonic::Status::unavailable("shutting down")).is_retryable());
        assert!(Error::from(tonic::Status::unknown("connection reset")).is_retryable());
        assert!(!Error::from(tonic::Status::invalid_argument("too many")).is_retryable());
        assert!(!Error::Protocol("x".into()).is_retryable());
        assert_eq!(
            Error::from(tonic::Status::unavailable("x")).code(),
            Some(Code::Unavailable)
        );
    }
}
