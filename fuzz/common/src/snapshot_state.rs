//! `vmkit-snapshot`: a state file's bytes through `decode_state`, as `read_state` and a
//! snapshot load run it, into a composite payload type shaped like a VM's state (strings,
//! byte and word vectors, nested structs, options, enums with data, maps, fixed arrays).
//!
//! The input's first byte picks how the rest is used: even, as the whole file (the header,
//! size and checksum checks); odd, as a payload sealed behind a valid header and checksum
//! ([`vmkit_snapshot::encode_raw`]), so that postcard's decoder meets hostile payloads.
//!
//! Oracles, besides "never panics":
//! - a file that decodes is exactly header + payload + checksum long, and its header's
//!   payload length says so;
//! - a decoded value encodes again (same kind) to a file that decodes to an equal value;
//! - a sealed payload that decodes re-encodes to the same payload bytes (postcard has one
//!   encoding per value, except for non-canonical varints, which are allowed to differ).

use std::collections::BTreeMap;

use vmkit_snapshot::{decode_state, encode_raw, encode_state, SnapshotKind};

/// A vCPU-like part.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    /// Registers.
    pub regs: Vec<u64>,
    /// A fixed-size blob carried as bytes.
    pub blob: Vec<u8>,
    /// A fixed array.
    pub id: [u8; 16],
    /// Optional.
    pub tsc_khz: Option<u32>,
}

/// A device-like part.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Device {
    /// No state.
    Nothing,
    /// A tuple variant.
    Queue(u16, u64, bool),
    /// A struct variant.
    Disk {
        /// Capacity.
        sectors: u64,
        /// Serial.
        serial: String,
    },
}

/// The composite payload (the lead switches the target to the VMM's `VmState`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Composite {
    /// A version.
    pub version: u32,
    /// A name.
    pub name: String,
    /// Nested structs.
    pub parts: Vec<Part>,
    /// Enums with data.
    pub devices: Vec<Device>,
    /// A map.
    pub names: BTreeMap<String, u64>,
    /// Signed and wide integers.
    pub offset: i64,
    /// Wide.
    pub wide: u128,
}

/// Runs one input.
pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check_file(rest);
    } else {
        let kind = if mode & 2 == 0 {
            SnapshotKind::Full
        } else {
            SnapshotKind::Diff
        };
        // A payload too large for a state file is refused by encode_raw: nothing to decode.
        if let Ok(file) = encode_raw(kind, rest) {
            if let Some(value) = check_file(&file) {
                let again = postcard_bytes(kind, &value);
                assert!(
                    again.len() <= rest.len(),
                    "re-encoding grew the payload: {} > {}",
                    again.len(),
                    rest.len()
                );
            }
        }
    }
}

/// Decodes `bytes` as a state file and checks the oracles on success.
fn check_file(bytes: &[u8]) -> Option<Composite> {
    let (header, value) = decode_state::<Composite>(bytes).ok()?;
    let expected = vmkit_snapshot::HEADER_SIZE as u64
        + header.payload_len
        + vmkit_snapshot::TRAILER_SIZE as u64;
    assert_eq!(expected, bytes.len() as u64, "{header:?}");
    let again = encode_state(header.kind, &value).expect("a decoded value encodes");
    let (h2, v2) = decode_state::<Composite>(&again).expect("a re-encoded value decodes");
    assert_eq!(v2, value);
    assert_eq!(h2.kind, header.kind);
    Some(value)
}

/// The payload bytes `value` encodes to.
fn postcard_bytes(kind: SnapshotKind, value: &Composite) -> Vec<u8> {
    let file = encode_state(kind, value).expect("a decoded value encodes");
    file[vmkit_snapshot::HEADER_SIZE..file.len() - vmkit_snapshot::TRAILER_SIZE].to_vec()
}

/// Well-formed state files and sealed payloads, for the fuzzer to start from.
pub fn seeds() -> Vec<Vec<u8>> {
    let value = Composite {
        version: 1,
        name: "vm".into(),
        parts: vec![
            Part {
                regs: vec![0, 1, u64::MAX],
                blob: vec![0xAB; 64],
                id: [7; 16],
                tsc_khz: Some(2_000_000),
            },
            Part {
                regs: vec![],
                blob: vec![],
                id: [0; 16],
                tsc_khz: None,
            },
        ],
        devices: vec![
            Device::Nothing,
            Device::Queue(256, 0x1000, true),
            Device::Disk {
                sectors: 1 << 20,
                serial: "disk0".into(),
            },
        ],
        names: [("a".to_string(), 1), ("b".to_string(), 2)].into(),
        offset: -5,
        wide: u128::MAX,
    };
    let mut out = Vec::new();
    for kind in [SnapshotKind::Full, SnapshotKind::Diff] {
        let file = encode_state(kind, &value).expect("the seed encodes");
        let mut whole = vec![0u8];
        whole.extend_from_slice(&file);
        out.push(whole);
        let mut sealed = vec![if kind == SnapshotKind::Full { 1 } else { 3 }];
        sealed.extend_from_slice(&postcard_bytes(kind, &value));
        out.push(sealed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_and_damaged_files_do_not() {
        for seed in seeds() {
            fuzz(&seed);
        }
        let seed = &seeds()[0];
        assert!(
            check_file(&seed[1..]).is_some(),
            "the whole-file seed decodes"
        );
        let mut bad = seed[1..].to_vec();
        bad[70] ^= 1;
        assert!(check_file(&bad).is_none());
        // A sealed payload cut short decodes to nothing (and does not panic).
        let sealed = &seeds()[1];
        let file = encode_raw(SnapshotKind::Full, &sealed[1..sealed.len() - 3]).unwrap();
        assert!(check_file(&file).is_none());
    }
}
