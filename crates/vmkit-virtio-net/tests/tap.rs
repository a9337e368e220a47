//! `Tap` against the kernel: each test runs on a thread that moved into a network namespace
//! of its own (`unshare(CLONE_NEWNET)`, so no interface of the host is touched) and creates
//! the TAP there itself. Needs root (`cfg(not_root)` marks them ignored otherwise).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};

use vmkit_virtio_net::{Error, NetBackend, Offloads, Tap};

/// Runs `f` on a new thread inside a new, empty network namespace.
fn in_new_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare with a constant flag; it only changes this thread's namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        f();
    })
    .join()
    .unwrap();
}

/// Creates TAP `name` with `flags` and returns the queue fd that keeps it alive.
fn create(name: &str, flags: libc::c_int) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: all zeros is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF with a pointer to a live ifreq.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

const VNET: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

#[test]
#[cfg_attr(not_root, ignore = "needs root and /dev/net/tun")]
fn queues_of_a_multi_queue_tap_open_with_offloads() {
    in_new_netns(|| {
        let _keep = create("vmk0", VNET | libc::IFF_MULTI_QUEUE).unwrap();
        let mut taps = Tap::open_queues("vmk0", 2).unwrap();
        assert_eq!(taps.len(), 2);
        assert_eq!(taps[0].name(), "vmk0");
        assert_eq!(taps[0].mtu().unwrap(), 1500);
        let o = taps[0].supported_offloads();
        let want = Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
        assert!(o.contains(want), "{o:?}");
        taps[1].set_offloads(want).unwrap();
        // A queue leaves and rejoins the TAP's steering (twice each: idempotent).
        for enabled in [false, false, true, true] {
            taps[1].set_enabled(enabled).unwrap();
        }
        assert!(taps[1].readable_fd().unwrap().is_some());
        // A single-queue open of a multi-queue TAP is refused by the kernel.
        assert!(matches!(
            Tap::open("vmk0"),
            Err(Error::Tap {
                what: "TUNSETIFF",
                ..
            })
        ));
    });
}

#[test]
#[cfg_attr(not_root, ignore = "needs root and /dev/net/tun")]
fn several_queues_of_a_single_queue_tap_are_refused() {
    in_new_netns(|| {
        let keep = create("vmk1", VNET).unwrap();
        drop(keep);
        // Not persistent: gone with its last fd.
        assert!(matches!(Tap::open("vmk1"), Err(Error::NoSuchTap(_))));
        let _keep = create("vmk1", VNET).unwrap();
        let err = Tap::open_queues("vmk1", 2).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Tap {
                    what: "TUNSETIFF",
                    ..
                }
            ),
            "{err}"
        );
    });
}

#[test]
#[cfg_attr(not_root, ignore = "needs root and /dev/net/tun")]
fn handed_over_fds_must_carry_the_vnet_header() {
    in_new_netns(|| {
        let good = create("vmk2", VNET).unwrap();
        let tap = Tap::from_fd(OwnedFd::from(good)).unwrap();
        assert_eq!(tap.name(), "vmk2");
        let plain = create("vmk3", libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
        match Tap::from_fd(OwnedFd::from(plain)) {
            Err(Error::NotVnetTap(name)) => assert_eq!(name, "vmk3"),
            other => panic!("{other:?}"),
        }
        let tun = create("vmk4", libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR).unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(tun)),
            Err(Error::NotVnetTap(_))
        ));
    });
}
