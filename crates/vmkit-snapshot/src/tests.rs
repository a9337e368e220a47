use super::*;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Vcpu {
    regs: Vec<u64>,
    lapic: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct State {
    name: String,
    vcpus: Vec<Vcpu>,
    kind: SnapshotKind,
    flag: Option<bool>,
}

fn sample() -> State {
    State {
        name: "vm".into(),
        vcpus: vec![
            Vcpu {
                regs: vec![1, 2, u64::MAX],
                lapic: vec![0xAB; 1024],
            },
            Vcpu {
                regs: vec![],
                lapic: vec![],
            },
        ],
        kind: SnapshotKind::Diff,
        flag: Some(true),
    }
}

/// A directory of its own under the temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("vmkit-snapshot-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `bytes` with its checksum made right again (for header fields behind the checksum).
fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
    let end = bytes.len() - TRAILER_SIZE;
    let crc = CRC.checksum(&bytes[..end]);
    bytes[end..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn a_state_round_trips_through_bytes_and_files() {
    let bytes = encode_state(SnapshotKind::Full, &sample()).unwrap();
    assert_eq!(&bytes[..8], b"VMKITSNP");
    let (header, back): (Header, State) = decode_state(&bytes).unwrap();
    assert_eq!(back, sample());
    assert_eq!(header.kind, SnapshotKind::Full);
    assert_eq!(header.format_version, FORMAT_VERSION);
    assert_eq!(header.vmkit_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        header.payload_len as usize,
        bytes.len() - HEADER_SIZE - TRAILER_SIZE
    );

    let dir = TempDir::new("roundtrip");
    let path = dir.0.join("vmstate");
    write_state(&path, SnapshotKind::Diff, &sample()).unwrap();
    // Replaced whole by a second write; no temporary file left behind.
    let mut other = sample();
    other.name = "second".into();
    write_state(&path, SnapshotKind::Diff, &other).unwrap();
    let (header, back): (Header, State) = read_state(&path).unwrap();
    assert_eq!(header.kind, SnapshotKind::Diff);
    assert_eq!(back, other);
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("vmstate")]);
}

#[test]
fn every_truncation_is_refused_as_truncated_or_bad_magic() {
    let bytes = encode_state(SnapshotKind::Full, &sample()).unwrap();
    for n in 0..bytes.len() {
        let e = decode_state::<State>(&bytes[..n]).unwrap_err();
        assert!(matches!(e, Error::Truncated { .. }), "{n} bytes: {e}");
    }
    let e = decode_state::<State>(&bytes[..100]).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        decode_state::<State>(&longer),
        Err(Error::TrailingBytes { extra: 1 })
    ));
}

#[test]
fn every_flipped_bit_is_refused() {
    let bytes = encode_state(SnapshotKind::Full, &sample()).unwrap();
    for i in 0..bytes.len() {
        for bit in [0, 3, 7] {
            let mut bad = bytes.clone();
            bad[i] ^= 1 << bit;
            assert!(
                decode_state::<State>(&bad).is_err(),
                "byte {i} bit {bit} went unnoticed"
            );
        }
    }
    let mut bad = bytes.clone();
    bad[HEADER_SIZE + 3] ^= 0x10;
    let e = decode_state::<State>(&bad).unwrap_err();
    assert!(matches!(e, Error::ChecksumMismatch { .. }), "{e}");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
}

#[test]
fn wrong_magic_version_kind_and_header_are_named() {
    let bytes = encode_state(SnapshotKind::Full, &sample()).unwrap();
    let mut other = bytes.clone();
    other[..8].copy_from_slice(b"QEVM\0\0\0\x03");
    let e = decode_state::<State>(&other).unwrap_err();
    assert!(e.to_string().starts_with("not a vmkit state file"), "{e}");
    let mut v2 = bytes.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = decode_state::<State>(&v2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "state file format version 2 not supported (this vmkit reads 1)"
    );
    let mut kind = bytes.clone();
    kind[12] = 9;
    let e = decode_state::<State>(&resealed(kind)).unwrap_err();
    assert!(matches!(e, Error::BadHeader(_)), "{e}");
    let mut reserved = bytes.clone();
    reserved[14] = 1;
    assert!(decode_state::<State>(&resealed(reserved)).is_err());
    let mut version = bytes.clone();
    version[16 + 20] = b'x'; // after the NUL padding started
    assert!(decode_state::<State>(&resealed(version)).is_err());
}

#[test]
fn a_payload_of_another_shape_names_the_field() {
    #[derive(serde::Serialize)]
    struct Other {
        name: String,
        vcpus: Vec<(Vec<u64>, u32)>,
    }
    // The second vCPU's `lapic` length claims more bytes than follow.
    let other = Other {
        name: "vm".into(),
        vcpus: vec![(vec![1], 0), (vec![], 1000)],
    };
    let bytes = encode_state(SnapshotKind::Full, &other).unwrap();
    let e = decode_state::<State>(&bytes).unwrap_err();
    match &e {
        // postcard encodes structs as tuples: fields by position. vcpus (field 1), its
        // element 1, lapic (field 1), its element 0 (where the bytes ran out).
        Error::Decode { path, .. } => assert_eq!(path, "[1][1][1][0]"),
        e => panic!("{e}"),
    }
    assert!(e.to_string().contains("at `[1][1][1][0]`"), "{e}");
    // A payload with bytes left over.
    let bytes = encode_state(SnapshotKind::Full, &(sample(), 7u8)).unwrap();
    assert!(matches!(
        decode_state::<State>(&bytes),
        Err(Error::TrailingPayload(1))
    ));
}

#[test]
fn oversized_files_are_refused_before_reading() {
    let dir = TempDir::new("large");
    let path = dir.0.join("vmstate");
    let f = File::create(&path).unwrap();
    f.set_len(MAX_STATE_SIZE + 1).unwrap();
    let e = read_state::<State>(&path).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let e = read_state::<State>(&dir.0.join("missing")).unwrap_err();
    assert!(e.to_string().contains("cannot open"), "{e}");
    // A payload over the limit is not written.
    let big = vec![0u8; MAX_STATE_SIZE as usize];
    let e = write_state(&path, SnapshotKind::Full, &big).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

#[test]
fn a_claimed_length_beyond_the_bytes_allocates_nothing_large() {
    // A payload whose first sequence claims 2^60 elements: postcard reads the elements as
    // they come and fails at the end of the bytes; serde preallocates at most ~1 MiB.
    #[derive(serde::Serialize)]
    struct Claim {
        name: String,
    }
    let mut bytes = encode_state(SnapshotKind::Full, &Claim { name: "vm".into() }).unwrap();
    // Payload: varint 2, "vm". Replace with name "", vcpus length 2^60 (varint), nothing.
    let payload: Vec<u8> = {
        let mut p = vec![0u8];
        let mut n: u64 = 1 << 60;
        while n >= 0x80 {
            p.push((n as u8) | 0x80);
            n >>= 7;
        }
        p.push(n as u8);
        p
    };
    bytes.truncate(HEADER_SIZE);
    bytes[48..56].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&[0; 8]);
    let bytes = resealed(bytes);
    let e = decode_state::<State>(&bytes).unwrap_err();
    assert!(matches!(e, Error::Decode { .. }), "{e}");
}
