//! vsock-guest: a tiny static helper run inside test guests, because busybox has no vsock.
//!
//! `vsock-guest listen PORT` accepts one connection on the guest's vsock port PORT;
//! `vsock-guest connect PORT` connects to the host (context id 2) on port PORT. Either way it
//! then echoes every byte it receives until the peer shuts its sending side, shuts its own
//! sending side, prints `VSOCK-GUEST-DONE <bytes>` and exits 0. Errors go to stderr with a
//! non-zero status. Built for x86_64-unknown-linux-musl so it runs in the busybox initramfs.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use anyhow::{Context, bail};

/// The host's vsock context id.
#[cfg(target_os = "linux")]
const HOST_CID: u32 = 2;

#[cfg(target_os = "linux")]
fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value before filling it in.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

#[cfg(target_os = "linux")]
fn vsock_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned fd is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_VSOCK)");
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(target_os = "linux")]
fn check(ret: libc::c_int, what: &str) -> anyhow::Result<libc::c_int> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_owned());
    }
    Ok(ret)
}

#[cfg(target_os = "linux")]
fn open(mode: &str, port: u32) -> anyhow::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket()?;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>())
        .context("sockaddr_vm size")?;
    let stream_fd = match mode {
        "listen" => {
            let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
            // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the call's duration.
            let ret =
                unsafe { libc::bind(sock.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) };
            check(ret, "bind")?;
            // SAFETY: listen(2) on a socket we own.
            check(unsafe { libc::listen(sock.as_raw_fd(), 1) }, "listen")?;
            println!("VSOCK-GUEST-LISTENING {port}");
            // SAFETY: accept(2) on our listening socket; peer address not requested.
            let fd = check(
                unsafe {
                    libc::accept4(
                        sock.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                },
                "accept",
            )?;
            // SAFETY: `fd` was just returned by accept4(2) and is owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
        "connect" => {
            let addr = vsock_addr(HOST_CID, port);
            // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the call's duration.
            let ret =
                unsafe { libc::connect(sock.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) };
            check(ret, "connect")?;
            sock
        }
        other => bail!("unknown mode {other:?}: use listen or connect"),
    };
    // A vsock stream behaves like any stream socket for read/write/shutdown.
    Ok(std::os::unix::net::UnixStream::from(stream_fd))
}

#[cfg(not(target_os = "linux"))]
fn open(_mode: &str, _port: u32) -> anyhow::Result<std::os::unix::net::UnixStream> {
    bail!("vsock-guest runs inside Linux guests only")
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(port)) = (args.get(1), args.get(2)) else {
        bail!("usage: vsock-guest listen|connect PORT");
    };
    let port: u32 = port
        .parse()
        .with_context(|| format!("invalid port {port:?}"))?;
    let mut stream = open(mode, port)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read"),
        };
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).context("read past buffer")?;
        stream.write_all(chunk).context("write")?;
        total += n as u64;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .context("shutdown")?;
    println!("VSOCK-GUEST-DONE {total}");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock-guest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
