//! Errors, and the one place that maps each kind of error to a gRPC code and an HTTP
//! status (quickwit's `ServiceErrorCode`): the gRPC service and the HTTP gateway both
//! go through [`ErrorKind`], nobody picks a status code at a call site.

use tonic::{Code, Status};

/// Why a single sample was refused. Its `Display` is the verdict's `error` field: a
/// stable machine-readable reason, a colon, and a human explanation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    /// The device id is longer than `MAX_DEVICE_ID_LEN`.
    #[error("invalid_device_id: device id is {len} bytes; limit is {limit}")]
    DeviceIdTooLong {
        /// Length of the offending id.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The sample has no metric.
    #[error("no_metrics: sample has no metrics")]
    NoMetrics,
    /// A metric name is empty, too long, or has a character outside `[A-Za-z0-9_.:-]`.
    #[error("invalid_metric_name: metric {name:?} {reason}")]
    InvalidMetricName {
        /// The offending name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value is NaN or infinite.
    #[error("invalid_value: metric {metric:?} is {}", describe(*value))]
    InvalidValue {
        /// The metric carrying it.
        metric: String,
        /// The value.
        value: f64,
    },
    /// The device would have more than `MAX_METRICS_PER_DEVICE` metrics.
    #[error("too_many_metrics: device {device:?} would have {count} metrics; limit is {limit}")]
    TooManyMetrics {
        /// The device.
        device: String,
        /// Metrics it would have.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The sequence number jumps further ahead than the device may go: above both its
    /// last `seq` plus `MAX_SEQ_JUMP` and the server's clock in microseconds plus
    /// `MAX_SEQ_CLOCK_SKEW` (docs/architecture.md, "Engine semantics").
    #[error(
        "invalid_seq: seq {seq} is above {limit} (last seq {last} plus MAX_SEQ_JUMP, or the server's clock in microseconds plus MAX_SEQ_CLOCK_SKEW)"
    )]
    InvalidSeq {
        /// The offending sequence number.
        seq: u64,
        /// The device's last applied `seq` (0 for a new device).
        last: u64,
        /// The largest `seq` the device could have sent.
        limit: u64,
    },
    /// `MAX_DEVICES` devices are in memory already.
    #[error("device_limit: {limit} devices are in memory; no room for a new one")]
    DeviceLimit {
        /// The configured limit.
        limit: usize,
    },
    /// The device is outside the caller's device namespace. Says nothing of whether
    /// the device exists.
    #[error(
        "permission_denied: device {device:?} is outside the namespace of principal {principal:?}"
    )]
    PermissionDenied {
        /// The device.
        device: String,
        /// Who sent the sample.
        principal: String,
    },
    /// Admitting the device, its new metrics or a larger window would take the
    /// engine's memory past `MEMORY_BUDGET` (`docs/operations.md`, "Memory").
    #[error(
        "memory_budget: device {device:?} needs {need} more bytes; {used} of MEMORY_BUDGET ({budget} bytes) are in use"
    )]
    MemoryBudget {
        /// The device.
        device: String,
        /// Bytes the sample would have added.
        need: usize,
        /// Bytes in use when it was refused.
        used: usize,
        /// The configured budget.
        budget: usize,
    },
    /// The device is not in memory and the principal holds its `devices` quota of
    /// devices already (`docs/security.md`, "Quotas"). Says nothing of whether the
    /// device has a snapshot.
    #[error(
        "device_quota: principal {principal:?} holds its quota of {limit} devices; no room for a new one"
    )]
    DeviceQuota {
        /// Who sent the sample.
        principal: String,
        /// Its `devices` quota.
        limit: u64,
    },
    /// Another replica holds the device and did not hand it over in time (it is
    /// busy, or it died and its lease has not run out): nothing was applied, and
    /// sending the sample again is safe (`docs/architecture.md`, "Replicas").
    #[error("moved: device {device:?} is held by another replica; retry")]
    Moved {
        /// The device.
        device: String,
    },
}

fn describe(value: f64) -> &'static str {
    if value.is_nan() {
        "NaN"
    } else if value > 0.0 {
        "+Infinity"
    } else {
        "-Infinity"
    }
}

impl SampleError {
    /// Every stable reason, in the order of [`SampleError::index`].
    pub const REASONS: [&'static str; 11] = [
        "invalid_device_id",
        "no_metrics",
        "invalid_metric_name",
        "invalid_value",
        "too_many_metrics",
        "device_limit",
        "permission_denied",
        "moved",
        "invalid_seq",
        "memory_budget",
        "device_quota",
    ];

    /// Position of this error's reason in [`SampleError::REASONS`].
    pub fn index(&self) -> usize {
        match self {
            Self::DeviceIdTooLong { .. } => 0,
            Self::NoMetrics => 1,
            Self::InvalidMetricName { .. } => 2,
            Self::InvalidValue { .. } => 3,
            Self::TooManyMetrics { .. } => 4,
            Self::DeviceLimit { .. } => 5,
            Self::PermissionDenied { .. } => 6,
            Self::Moved { .. } => 7,
            Self::InvalidSeq { .. } => 8,
            Self::MemoryBudget { .. } => 9,
            Self::DeviceQuota { .. } => 10,
        }
    }

    /// The stable reason, used as the `reason` label of the rejected-samples counter.
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

/// Kinds of request-level errors, each with one gRPC code and one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or breaks a limit on its shape.
    InvalidArgument,
    /// The request is too large (message or body size).
    TooLarge,
    /// The thing asked about does not exist.
    NotFound,
    /// The server is at a configured capacity limit (streams, concurrency).
    Overloaded,
    /// The server is shutting down or not ready.
    Unavailable,
    /// A stream or request ran out of its time.
    Timeout,
    /// The client sent its request too slowly, or not all of it in time
    /// (`MIN_UPLOAD_RATE`, `FIRST_MESSAGE_TIMEOUT`): HTTP `408`.
    SlowClient,
    /// A bug or an unexpected failure; never carries internal detail to the client.
    Internal,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials that do not allow this call.
    PermissionDenied,
    /// The caller's own quota is used up; retry after the time given.
    RateLimited,
}

impl ErrorKind {
    /// The gRPC status code.
    pub fn grpc_code(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::TooLarge => Code::ResourceExhausted,
            Self::NotFound => Code::NotFound,
            Self::Overloaded => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::Timeout | Self::SlowClient => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::RateLimited => Code::ResourceExhausted,
        }
    }

    /// The HTTP status code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument => 400,
            Self::TooLarge => 413,
            Self::NotFound => 404,
            Self::Overloaded => 503,
            Self::Unavailable => 503,
            Self::Timeout => 504,
            Self::SlowClient => 408,
            Self::Internal => 500,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::RateLimited => 429,
        }
    }

    /// The machine-readable code of the HTTP error body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::TooLarge => "too_large",
            Self::NotFound => "not_found",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::SlowClient => "request_timeout",
            Self::Internal => "internal",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// A request-level error: a kind and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Decides the gRPC code and HTTP status.
    pub kind: ErrorKind,
    /// Safe to show to the client.
    pub message: String,
    /// When retrying helps, after how long (`grpc-retry-pushback-ms`, `Retry-After`).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry after `delay`.
    pub fn retry_after(mut self, delay: std::time::Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let mut status = Status::new(e.kind.grpc_code(), e.message);
        if let Some(delay) = e.retry_after {
            let millis = delay.as_millis().max(1).to_string();
            if let Ok(value) = millis.parse() {
                status
                    .metadata_mut()
                    .insert("grpc-retry-pushback-ms", value);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_stable_reasons() {
        let e = SampleError::InvalidValue {
            metric: "cpu".into(),
            value: f64::NAN,
        };
        assert_eq!(e.to_string(), "invalid_value: metric \"cpu\" is NaN");
        assert_eq!(e.reason(), "invalid_value");
        assert!(e.to_string().starts_with(e.reason()));
        let e = SampleError::DeviceLimit { limit: 3 };
        assert!(e.to_string().starts_with(e.reason()));
    }

    #[test]
    fn one_mapping_for_both_transports() {
        let s: Status = ApiError::new(ErrorKind::TooLarge, "too big").into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(ErrorKind::TooLarge.http_status(), 413);
        assert_eq!(ErrorKind::NotFound.grpc_code(), Code::NotFound);
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
    }
}
