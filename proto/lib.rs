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
}

/// Encoded `FileDescriptorSet` of every tidewatch proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tidewatch_descriptor");

/// `google.protobuf` well-known types with proto3 JSON support.
pub use pbjson_types;
