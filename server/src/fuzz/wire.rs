//! Protobuf wire bytes written by hand, for what prost will not write: unknown fields
//! of every wire type, groups, repeated keys, cuts. The fuzz seed corpus
//! (`fuzz::tests`) and the gRPC conformance test (`tests/it/conformance.rs`) build
//! their odd requests from these.

/// The key of `field` with `wire_type` (0 varint, 1 fixed64, 2 length-delimited, 3
/// and 4 group start and end, 5 fixed32).
pub fn key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    varint(out, (field << 3) | wire_type);
}

/// `v` as a base-128 varint.
pub fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited `field` holding `payload`.
pub fn len_field(out: &mut Vec<u8>, field: u64, payload: &[u8]) {
    key(out, field, 2);
    varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// One entry of `Sample.metrics`: key `name` (may be any bytes), double `value`.
pub fn entry(name: &[u8], value: f64) -> Vec<u8> {
    let mut e = Vec::new();
    len_field(&mut e, 1, name);
    e.push(0x11);
    e.extend_from_slice(&value.to_le_bytes());
    e
}

/// A group `field` around `inner`.
pub fn group(field: u64, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, field, 3);
    out.extend_from_slice(inner);
    key(&mut out, field, 4);
    out
}

/// Unknown fields of every wire type, a group with a nested group among them.
pub fn unknowns() -> Vec<u8> {
    let mut u = Vec::new();
    key(&mut u, 90, 0);
    varint(&mut u, u64::MAX);
    key(&mut u, 91, 1);
    u.extend_from_slice(&1u64.to_le_bytes());
    key(&mut u, 92, 5);
    u.extend_from_slice(&2u32.to_le_bytes());
    len_field(&mut u, 93, b"from a newer client");
    let mut inner = Vec::new();
    key(&mut inner, 1, 0);
    varint(&mut inner, 300);
    len_field(&mut inner, 2, b"x");
    inner.extend(group(3, &[]));
    u.extend(group(94, &inner));
    u
}

/// An `IngestRequest` of one sample made of the raw `fields`.
pub fn raw_sample(fields: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    len_field(&mut r, 1, fields);
    r
}

/// The fields of a sample of `device` with one metric, `cpu` = 1.5.
pub fn sample_fields(device: &str) -> Vec<u8> {
    let mut s = Vec::new();
    len_field(&mut s, 1, device.as_bytes());
    len_field(&mut s, 3, &entry(b"cpu", 1.5));
    s
}
