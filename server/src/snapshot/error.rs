//! Why a snapshot value could not be decoded (either version).

use crate::engine::StateError;

/// The encoding versions this build reads, for the error message.
const READS: &str = "1 and 2";

/// Why a snapshot value could not be decoded. The device then starts fresh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The value does not start with `b"TW"`.
    #[error("not a tidewatch snapshot (bad magic)")]
    Magic,
    /// Written by another encoding version.
    #[error("snapshot encoding version {0} is not supported (this build reads {READS})")]
    Version(u8),
    /// The value ends in the middle of a field.
    #[error("snapshot is truncated while reading {0}")]
    Truncated(&'static str),
    /// The message is not a valid `DeviceSnapshot` (what prost says of it).
    #[error("snapshot message is malformed: {0}")]
    Message(String),
    /// A field holds a value the engine cannot have produced.
    #[error("snapshot field {field} is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes are left after the device.
    #[error("snapshot has {0} trailing bytes")]
    Trailing(usize),
    /// The value under a device's key holds another device.
    #[error("snapshot holds device {found:?}, expected {expected:?}")]
    WrongDevice {
        /// The device whose key was read.
        expected: String,
        /// The device the value holds.
        found: String,
    },
}

impl From<StateError> for DecodeError {
    fn from(StateError { field, reason }: StateError) -> Self {
        Self::Invalid { field, reason }
    }
}
