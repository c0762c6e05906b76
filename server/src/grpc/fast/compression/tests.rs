//! Unit tests of the fast path's compression: round trips, the size limit while
//! decompressing, broken data, and the header negotiation.

use std::io::Write as _;

use bytes::BytesMut;
use http::HeaderMap;
use tonic::Code;

use super::*;

const ALL: [Encoding; 3] = [Encoding::Gzip, Encoding::Deflate, Encoding::Zstd];

/// `data` compressed with `encoding` by the crates' writers (not the code under test).
fn compressed(encoding: Encoding, data: &[u8]) -> Vec<u8> {
    match encoding {
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Encoding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Encoding::Zstd => zstd::encode_all(data, 19).unwrap(),
    }
}

fn sample_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 7) as u8).collect()
}

#[test]
fn compressed_responses_decompress_to_what_was_written() {
    for encoding in ALL {
        for len in [0, 1, 100, 5000, 70_000] {
            let data = sample_bytes(len);
            let mut out = BytesMut::from(&b"prefix"[..]);
            out.extend_from_slice(&data);
            Compressor::new(encoding)
                .compress_tail(&mut out, 6)
                .expect("compressed");
            assert_eq!(&out[..6], b"prefix");
            let back = Decompressor::new(encoding)
                .decompress(&out[6..], 1 << 20)
                .expect("decompressed");
            assert_eq!(back[..], data[..], "{encoding:?} {len}");
        }
    }
}

#[test]
fn a_message_of_exactly_the_limit_decompresses() {
    for encoding in ALL {
        let data = sample_bytes(4096);
        let back = Decompressor::new(encoding)
            .decompress(&compressed(encoding, &data), 4096)
            .expect("within the limit");
        assert_eq!(back.len(), 4096, "{encoding:?}");
        let over = Decompressor::new(encoding)
            .decompress(&compressed(encoding, &sample_bytes(4097)), 4096)
            .expect_err("one byte over");
        assert_eq!(over.code(), Code::ResourceExhausted, "{encoding:?}");
    }
}

/// A bomb: 16 MiB of zeros in 16 KiB (deflate's best ratio) or a few bytes (zstd).
/// Decompression stops at the limit: the buffer never grows past a small multiple of it.
#[test]
fn a_bomb_is_refused_without_being_expanded() {
    let zeros = vec![0u8; 16 << 20];
    for encoding in ALL {
        let bomb = compressed(encoding, &zeros);
        assert!(bomb.len() < 32 << 10, "{encoding:?}: {} bytes", bomb.len());
        let mut decompressor = Decompressor::new(encoding);
        let status = decompressor.decompress(&bomb, 4096).expect_err("a bomb");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "Error decompressing: size limit, of 4096 bytes, exceeded while decompressing message (MAX_MESSAGE_BYTES)"
        );
        assert!(
            decompressor.buf.capacity() <= 4 * 4096,
            "{encoding:?}: grew to {}",
            decompressor.buf.capacity()
        );
        // A large message's buffer is not kept for the stream's next ones.
        let large = decompressor
            .decompress(&compressed(encoding, &zeros[..KEEP + 1]), 1 << 20)
            .expect("within the limit");
        assert_eq!(large.len(), KEEP + 1);
        assert!(decompressor.buf.capacity() <= KEEP, "{encoding:?}");
        // The stream's next message still decompresses.
        let ok = decompressor
            .decompress(&compressed(encoding, b"after"), 4096)
            .expect("the next message");
        assert_eq!(&ok[..], b"after");
    }
}

/// Data that is not what it says, or gzip and zstd cut short: a zlib stream cut short
/// ends where it ends, for flate2 and so for tonic (the conformance test holds the rest
/// to tonic).
#[test]
fn broken_data_is_internal_with_tonics_text() {
    for encoding in ALL {
        let whole = compressed(encoding, &sample_bytes(3000));
        let mut broken = vec![&b"not compressed at all"[..]];
        if encoding != Encoding::Deflate {
            broken.push(&whole[..whole.len() / 2]);
        }
        for broken in broken {
            let status = Decompressor::new(encoding)
                .decompress(broken, 1 << 20)
                .expect_err("broken");
            assert_eq!(status.code(), Code::Internal, "{encoding:?}");
            assert!(
                status.message().starts_with("Error decompressing: ")
                    && status.message().ends_with(", while sending request"),
                "{encoding:?}: {}",
                status.message()
            );
        }
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.insert(*k, v.parse().unwrap());
    }
    map
}

#[test]
fn the_request_encoding_is_one_of_three_or_unimplemented() {
    assert_eq!(request_encoding(&headers(&[])).unwrap(), None);
    assert_eq!(
        request_encoding(&headers(&[("grpc-encoding", "identity")])).unwrap(),
        None
    );
    for encoding in ALL {
        let named = headers(&[("grpc-encoding", encoding.name())]);
        assert_eq!(request_encoding(&named).unwrap(), Some(encoding));
    }
    let status = request_encoding(&headers(&[("grpc-encoding", "br")])).unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(
        status.message(),
        "Content is compressed with `br` which isn't supported"
    );
    assert_eq!(
        status
            .metadata()
            .get("grpc-accept-encoding")
            .unwrap()
            .to_str()
            .unwrap(),
        "gzip,deflate,zstd,identity"
    );
}

#[test]
fn the_response_encoding_is_the_clients_first_enabled_one() {
    let accepts = |v: &'static str| headers(&[("grpc-accept-encoding", v)]);
    let both = [Encoding::Zstd, Encoding::Gzip];
    assert_eq!(
        response_encoding(&accepts("gzip, zstd"), &both),
        Some(Encoding::Gzip)
    );
    assert_eq!(
        response_encoding(&accepts("identity,deflate,gzip"), &both),
        Some(Encoding::Gzip)
    );
    assert_eq!(response_encoding(&accepts("deflate,identity"), &both), None);
    assert_eq!(response_encoding(&accepts("gzip"), &[]), None);
    assert_eq!(response_encoding(&headers(&[]), &both), None);
}
