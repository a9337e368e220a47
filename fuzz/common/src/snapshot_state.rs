//! `vmkit-snapshot`: a state file's bytes through `decode_state` into the whole VM's state
//! ([`VmState`], what `vmkit --restore` and `PUT /snapshot/load` read), then its checks
//! ([`VmState::validate`]: counts, sizes, memory layers and ranges, each vCPU's state).
//!
//! The input's first byte picks how the rest is used: even, as the whole file (the header,
//! size and checksum checks); odd, as a payload sealed behind a valid header and checksum
//! ([`vmkit_snapshot::encode_raw`]), so that postcard's decoder and the checks meet hostile
//! payloads.
//!
//! Oracles, besides "never panics" (and no allocation the input does not pay for, which
//! libFuzzer's `-rss_limit_mb` watches):
//! - a file that decodes is exactly header + payload + checksum long, and its header's
//!   payload length says so;
//! - a decoded state encodes again (same kind) to a file that decodes to an equal state,
//!   which validates the same way.
//!
//! Seeds: state files vmkit wrote (`seeds/*.vmstate`: the test guest mid-`test=soak` on 2
//! vCPUs with a disk and entropy, on virtio-mmio and on virtio-pci).

use vmkit_snapshot::vm::VmState;
use vmkit_snapshot::{decode_state, encode_raw, encode_state, SnapshotKind};

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
            check_file(&file);
        }
    }
}

/// Decodes `bytes` as a state file, validates it, and checks the oracles on success.
fn check_file(bytes: &[u8]) -> Option<VmState> {
    let (header, state) = decode_state::<VmState>(bytes).ok()?;
    let expected = vmkit_snapshot::HEADER_SIZE as u64
        + header.payload_len
        + vmkit_snapshot::TRAILER_SIZE as u64;
    assert_eq!(expected, bytes.len() as u64, "{header:?}");
    let valid = state.validate().is_ok();
    let again = encode_state(header.kind, &state).expect("a decoded state encodes");
    let (h2, s2) = decode_state::<VmState>(&again).expect("a re-encoded state decodes");
    assert_eq!(s2, state);
    assert_eq!(h2.kind, header.kind);
    assert_eq!(s2.validate().is_ok(), valid);
    Some(state)
}

/// State files vmkit wrote, whole and as sealed payloads.
pub fn seeds() -> Vec<Vec<u8>> {
    let files: [&[u8]; 2] = [
        include_bytes!("../seeds/soak-mmio.vmstate"),
        include_bytes!("../seeds/soak-pci.vmstate"),
    ];
    let mut out = Vec::new();
    for file in files {
        let mut whole = vec![0u8];
        whole.extend_from_slice(file);
        out.push(whole);
        let payload = &file[vmkit_snapshot::HEADER_SIZE..file.len() - vmkit_snapshot::TRAILER_SIZE];
        let mut sealed = vec![1u8];
        sealed.extend_from_slice(payload);
        out.push(sealed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_and_validate_and_damaged_files_do_not_decode() {
        for seed in seeds() {
            fuzz(&seed);
            let state = check_file(&encode_raw(SnapshotKind::Full, &seed[1..]).unwrap())
                .or_else(|| check_file(&seed[1..]))
                .expect("every seed decodes");
            state.validate().expect("every seed validates");
        }
        let seed = &seeds()[0];
        let mut bad = seed[1..].to_vec();
        bad[70] ^= 1;
        assert!(check_file(&bad).is_none());
        // A sealed payload cut short decodes to nothing (and does not panic).
        let sealed = &seeds()[1];
        let file = encode_raw(SnapshotKind::Full, &sealed[1..sealed.len() - 3]).unwrap();
        assert!(check_file(&file).is_none());
    }
}
