#!/usr/bin/env python3
"""Drive an already running Firecracker-compatible API server (vmkit --api-sock)
with a third-party client from PyPI, firecracker-python (import name
`firecracker`), and check that it boots, pauses, resumes, and reports its state.

Run it with the venv that setup-venv.sh prints:

    PY=$(examples/vmkit-vmm/tests/api/setup-venv.sh)
    "$PY" examples/vmkit-vmm/tests/api/fc_client_test.py --sock /tmp/vmkit.sock \
        --kernel bzImage [--initrd initrd.img] [--boot-args '...'] [--disk root.img] \
        [--expect-serial serial.log [--expect 'login:']] [--ctrl-alt-del]

One line per step, with the round-trip time of each API call in ms. Exit code
0 when every check passes, 1 when a check fails (the FAIL line says which),
2 on a usage or setup error (client missing, socket missing). The last line
is "fc_client_test: N passed, N failed".

Every request goes through the client's own classes: `Api` and its
`Resource`s. The client has no `/entropy` resource, so that step builds one
with the client's generic `firecracker.api.Resource` class. It writes no HTTP
of its own.
"""

import argparse
import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
import time

CLIENT_PIN = "firecracker-python==0.0.5"


class CheckFailed(Exception):
    pass


class Watchdog(BaseException):
    """Raised from SIGALRM. A BaseException, so urllib3's retry loop (which catches
    OSError, and so TimeoutError) cannot swallow it and retry."""


def import_client():
    # `import firecracker` runs the package __init__. It prints a warning on stdout
    # when /usr/local/bin/firecracker is absent; keep that out of our step lines.
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):
            from firecracker.api import Api, Resource
            from firecracker.exceptions import APIError
    except ImportError as e:
        print(f"FAIL setup: cannot import the client ({e}); "
              f"run setup-venv.sh and use the python it prints ({CLIENT_PIN})", file=sys.stderr)
        sys.exit(2)
    return Api, Resource, APIError


def safe_socket_path(sock, tmpdir_holder):
    """firecracker-python puts the socket path in the host part of an http:// URL,
    and urllib3 lowercases it (`/tmp/A.sock` is dialled as `/tmp/a.sock`). A
    path with uppercase letters, '+', a space or '%', or one too long for
    sun_path, is reached through a symlink in a fresh mkdtemp directory (its
    name is lowercase)."""
    bad = sock != sock.lower() or any(c in sock for c in "+ %") or len(sock) > 100
    if not bad:
        return sock
    d = tempfile.mkdtemp(prefix="fcapi")
    tmpdir_holder.append(d)
    link = os.path.join(d, "api.sock")
    os.symlink(os.path.abspath(sock), link)
    if link != link.lower():
        raise CheckFailed(f"cannot make a lowercase path to {sock} (got {link}); set TMPDIR")
    return link


class Runner:
    def __init__(self, api, api_error, timeout):
        self.api = api
        self.APIError = api_error
        self.timeout = timeout
        self.n = 0

    def _alarm(self, signum, frame):
        raise Watchdog(f"no answer within {self.timeout} s")

    def call(self, name, fn):
        """Run one client call under a watchdog; print its round-trip time."""
        self.n += 1
        old = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        t0 = time.perf_counter()
        try:
            res = fn()
        except (self.APIError, Watchdog, OSError) as e:
            ms = (time.perf_counter() - t0) * 1000
            raise CheckFailed(f"step {self.n} {name}: {type(e).__name__}: {e} (after {ms:.1f} ms)")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        ms = (time.perf_counter() - t0) * 1000
        extra = ""
        if res is not None and getattr(res, "status_code", None) == 200:
            extra = " " + res.text.strip()
        elif res is not None:
            extra = f" -> {res.status_code}"
        print(f"ok   {self.n:2d} {name:<38s} {ms:8.2f} ms{extra}", flush=True)
        return res

    def note(self, name, msg):
        self.n += 1
        print(f"ok   {self.n:2d} {name:<38s} {'':>11s} {msg}", flush=True)

    def get_json(self, name, resource):
        res = self.call(name, resource.get)
        try:
            return res.json()
        except ValueError:
            raise CheckFailed(f"step {self.n} {name}: the 200 answer is not JSON: {res.text!r}")

    def expect_state(self, want):
        info = self.get_json(f"GET / (want state {want!r})", self.api.describe)
        for key in ("app_name", "id", "state", "vmm_version"):
            if key not in info:
                raise CheckFailed(f"step {self.n}: GET / lacks the required field {key!r}: {info}")
        if info["state"] != want:
            raise CheckFailed(f"step {self.n}: GET / says state {info['state']!r}, want {want!r}")
        return info


def file_size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def wait_for_text(path, text, timeout):
    deadline = time.monotonic() + timeout
    needle = text.encode()
    while True:
        try:
            with open(path, "rb") as f:
                if needle in f.read():
                    return True
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sock", required=True, help="API socket of the running server")
    ap.add_argument("--kernel", required=True, help="kernel_image_path for PUT /boot-source")
    ap.add_argument("--initrd", help="initrd_path for PUT /boot-source")
    ap.add_argument("--boot-args", default="console=ttyS0 reboot=k panic=1",
                    help="boot_args for PUT /boot-source (default: %(default)s)")
    ap.add_argument("--disk", help="path_on_host of a root drive (PUT /drives/rootfs)")
    ap.add_argument("--disk-read-only", action="store_true", help="is_read_only for --disk")
    ap.add_argument("--vcpus", type=int, default=1, help="vcpu_count (default 1)")
    ap.add_argument("--mem-mib", type=int, default=128, help="mem_size_mib (default 128)")
    ap.add_argument("--no-entropy", action="store_true", help="skip PUT /entropy")
    ap.add_argument("--expect-serial", metavar="FILE",
                    help="the server's serial output file; checked not to grow while paused")
    ap.add_argument("--expect", metavar="STR",
                    help="wait until FILE contains STR before pausing (needs --expect-serial)")
    ap.add_argument("--expect-timeout", type=float, default=60.0,
                    help="seconds to wait for --expect (default %(default)s)")
    ap.add_argument("--pause-seconds", type=float, default=1.0,
                    help="how long to stay paused (default %(default)s)")
    ap.add_argument("--ctrl-alt-del", action="store_true",
                    help="finish with PUT /actions SendCtrlAltDel")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds one API call may take (default %(default)s)")
    args = ap.parse_args()
    if args.expect and not args.expect_serial:
        ap.error("--expect needs --expect-serial")
    if not os.path.exists(args.sock):
        print(f"FAIL setup: no socket at {args.sock}", file=sys.stderr)
        return 2

    Api, Resource, APIError = import_client()
    tmpdirs = []
    r = None
    try:
        api = Api(safe_socket_path(args.sock, tmpdirs))
        r = Runner(api, APIError, args.timeout)
        print(f"# client {CLIENT_PIN}, socket {args.sock}"
              + (f" via {api.socket}" if api.socket != args.sock else ""), flush=True)

        r.expect_state("Not started")
        ver = r.get_json("GET /version", api.version)
        if not isinstance(ver.get("firecracker_version"), str):
            raise CheckFailed(f"step {r.n}: GET /version lacks firecracker_version: {ver}")

        r.call("PUT /machine-config",
               lambda: api.machine_config.put(vcpu_count=args.vcpus, mem_size_mib=args.mem_mib))
        mc = r.get_json("GET /machine-config", api.machine_config)
        if mc.get("vcpu_count") != args.vcpus or mc.get("mem_size_mib") != args.mem_mib:
            raise CheckFailed(f"step {r.n}: GET /machine-config says {mc}, want "
                              f"vcpu_count={args.vcpus} mem_size_mib={args.mem_mib}")

        # None values are dropped by the client, so no initrd_path key without --initrd.
        r.call("PUT /boot-source",
               lambda: api.boot.put(kernel_image_path=os.path.abspath(args.kernel),
                                    boot_args=args.boot_args,
                                    initrd_path=os.path.abspath(args.initrd) if args.initrd else None))

        if args.disk:
            r.call("PUT /drives/rootfs",
                   lambda: api.drive.put(drive_id="rootfs",
                                         path_on_host=os.path.abspath(args.disk),
                                         is_root_device=True,
                                         is_read_only=args.disk_read_only))

        if not args.no_entropy:
            # firecracker-python 0.0.5 has no entropy attribute on Api; build the
            # resource with its own Resource class. The body is {}.
            entropy = Resource(api, "/entropy")
            r.call("PUT /entropy", lambda: entropy.put())

        r.call("PUT /actions InstanceStart", lambda: api.actions.put(action_type="InstanceStart"))
        r.expect_state("Running")

        if args.expect:
            t0 = time.perf_counter()
            if not wait_for_text(args.expect_serial, args.expect, args.expect_timeout):
                raise CheckFailed(f"{args.expect!r} did not appear in {args.expect_serial} "
                                  f"within {args.expect_timeout} s")
            r.note("serial shows --expect", f"{args.expect!r} after {time.perf_counter() - t0:.2f} s")

        r.call("PATCH /vm Paused", lambda: api.vm.patch(state="Paused"))
        r.expect_state("Paused")

        if args.expect_serial:
            before = file_size(args.expect_serial)
            time.sleep(args.pause_seconds)
            after = file_size(args.expect_serial)
            if before < 0 and after < 0:
                raise CheckFailed(f"serial file {args.expect_serial} does not exist")
            if after != before:
                raise CheckFailed(f"serial output grew while paused: {args.expect_serial} "
                                  f"went from {before} to {after} bytes in {args.pause_seconds} s")
            r.note("serial did not grow while paused", f"{before} bytes over {args.pause_seconds} s")
        else:
            time.sleep(args.pause_seconds)
            r.note("stayed paused", f"{args.pause_seconds} s")
        r.expect_state("Paused")

        r.call("PATCH /vm Resumed", lambda: api.vm.patch(state="Resumed"))
        r.expect_state("Running")

        if args.ctrl_alt_del:
            r.call("PUT /actions SendCtrlAltDel", lambda: api.actions.put(action_type="SendCtrlAltDel"))

        print(f"fc_client_test: {r.n} passed, 0 failed", flush=True)
        return 0
    except CheckFailed as e:
        print(f"FAIL {e}", flush=True)
        print(f"fc_client_test: {r.n - 1 if r else 0} passed, 1 failed", flush=True)
        return 1
    finally:
        for d in tmpdirs:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
