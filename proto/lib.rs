//! Generated code for the `tidewatch.v1` API and the snapshot message the server keeps
//! in Redis (`snapshot.proto`): prost messages, tonic client and server stubs, serde
//! impls that follow the canonical proto3 JSON mapping (pbjson), and the encoded file
//! descriptor set for gRPC reflection. Nothing here is written by hand
//! except this wrapper; edit `proto/tidewatch/v1/*.proto` instead.

/// The `tidewatch.v1` package.
pub mod v1 {
    #![allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms
    )]
    tonic::include_proto!("tidewatch.v1");
    include!(concat!(env!("OUT_DIR"), "/tidewatch.v1.serde.rs"));
}

/// JSON helpers the generated serde code calls.
pub mod json {
    use serde::{Serialize, Serializer};

    /// A `double` serialized as the proto3 JSON mapping says: a number when finite,
    /// otherwise the string `"NaN"`, `"Infinity"` or `"-Infinity"`.
    #[derive(Debug, Clone, Copy)]
    pub struct ProtoDouble(pub f64);

    impl Serialize for ProtoDouble {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let v = self.0;
            if v.is_finite() {
                serializer.serialize_f64(v)
            } else if v.is_nan() {
                serializer.serialize_str("NaN")
            } else if v > 0.0 {
                serializer.serialize_str("Infinity")
            } else {
                serializer.serialize_str("-Infinity")
            }
        }
    }

    /// A `google.protobuf.Timestamp` serialized as the proto3 JSON mapping says: RFC 3339
    /// in UTC ending in `Z`, with 0, 3, 6 or 9 fractional digits
    /// (`2024-01-15T10:30:00.250Z`). Outside years 1 to 9999 it is an error, as in
    /// pbjson-types.
    #[derive(Debug, Clone, Copy)]
    pub struct ProtoTimestamp(pub pbjson_types::Timestamp);

    impl Serialize for ProtoTimestamp {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut out = String::with_capacity(30);
            format_timestamp(&self.0, &mut out).map_err(serde::ser::Error::custom)?;
            serializer.serialize_str(&out)
        }
    }

    /// Writes `t` as [`ProtoTimestamp`] does.
    fn format_timestamp(t: &pbjson_types::Timestamp, out: &mut String) -> Result<(), String> {
        use std::fmt::Write as _;
        const MIN: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
        const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
        if !(MIN..=MAX).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
            return Err(format!(
                "timestamp out of range: {}s {}ns",
                t.seconds, t.nanos
            ));
        }
        let days = t.seconds.div_euclid(86_400);
        let secs = t.seconds.rem_euclid(86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil inverse).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let _ = write!(
            out,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        let nanos = t.nanos;
        if nanos != 0 {
            if nanos % 1_000_000 == 0 {
                let _ = write!(out, ".{:03}", nanos / 1_000_000);
            } else if nanos % 1000 == 0 {
                let _ = write!(out, ".{:06}", nanos / 1000);
            } else {
                let _ = write!(out, ".{nanos:09}");
            }
        }
        out.push('Z');
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn z(seconds: i64, nanos: i32) -> Result<String, String> {
            let mut out = String::new();
            format_timestamp(&pbjson_types::Timestamp { seconds, nanos }, &mut out).map(|()| out)
        }

        #[test]
        fn timestamps_end_in_z_with_proto3_fraction_digits() {
            assert_eq!(z(0, 0).unwrap(), "1970-01-01T00:00:00Z");
            assert_eq!(z(1_705_314_600, 0).unwrap(), "2024-01-15T10:30:00Z");
            assert_eq!(
                z(1_705_314_600, 250_000_000).unwrap(),
                "2024-01-15T10:30:00.250Z"
            );
            assert_eq!(
                z(1_705_314_600, 250_000).unwrap(),
                "2024-01-15T10:30:00.000250Z"
            );
            assert_eq!(
                z(1_705_314_600, 1).unwrap(),
                "2024-01-15T10:30:00.000000001Z"
            );
            assert_eq!(z(951_782_400, 0).unwrap(), "2000-02-29T00:00:00Z");
            assert_eq!(z(-62_135_596_800, 0).unwrap(), "0001-01-01T00:00:00Z");
            assert_eq!(
                z(253_402_300_799, 999_999_999).unwrap(),
                "9999-12-31T23:59:59.999999999Z"
            );
            assert_eq!(z(-1, 0).unwrap(), "1969-12-31T23:59:59Z");
            assert!(z(253_402_300_800, 0).is_err());
            assert!(z(0, -1).is_err());
        }

        #[test]
        fn agrees_with_pbjson_types_on_the_instant() {
            // Every day boundary over four centuries parses back to the same instant.
            for seconds in (-62_135_596_800_i64..253_402_300_799).step_by(86_400 * 97 + 3_601) {
                let text = z(seconds, 0).unwrap();
                let back: pbjson_types::Timestamp =
                    serde_json::from_value(serde_json::Value::String(text.clone())).unwrap();
                assert_eq!(back.seconds, seconds, "{text}");
            }
        }
    }
}

/// Encoded `FileDescriptorSet` of every tidewatch proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tidewatch_descriptor");

/// `google.protobuf` well-known types with proto3 JSON support.
pub use pbjson_types;
