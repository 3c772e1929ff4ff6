//! The container's stdio on the host side: the FIFOs and log URIs containerd hands the shim.
//!
//! containerd passes one string per stream in `CreateTaskRequest` / `ExecProcessRequest`:
//! - empty: the stream is not wanted;
//! - a path: a FIFO that the client (ctr, nerdctl) holds the other end of;
//! - `file:///path`: stdout and stderr are appended to that file;
//! - `binary:///path?k=v&flag`: a logging program started with the query as arguments
//!   (`k v flag`), `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment, the read ends of
//!   a stdout pipe and a stderr pipe as fds 3 and 4, and the write end of a "ready" pipe as fd 5,
//!   which it closes once it is ready to read.
//!
//! [`open_stdio`] turns the three strings into async endpoints the copy loops use.

use std::io;
use std::os::fd::OwnedFd;

use command_fds::{CommandFdExt, FdMapping};
use std::path::{Path, PathBuf};
use std::process::Stdio as ProcStdio;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;

/// A failure to open one of the container's stdio endpoints.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The URI's scheme is not one containerd uses.
    #[error("unsupported stdio uri {uri:?}: expected a FIFO path, file:// or binary://")]
    UnsupportedUri {
        /// The URI as given.
        uri: String,
    },
    /// Opening a FIFO or file failed.
    #[error("opening {stream} at {path}")]
    Open {
        /// `stdin`, `stdout` or `stderr`.
        stream: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating the pipes for a logging binary failed.
    #[error("creating pipes for logging binary {path}")]
    Pipe {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Starting the logging binary failed.
    #[error("starting logging binary {path}")]
    SpawnLogger {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The logging binary exited before it was ready.
    #[error("logging binary {path} exited before signalling readiness")]
    LoggerNotReady {
        /// The binary.
        path: PathBuf,
    },
}

/// The three stdio strings of a process, as containerd sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioUris {
    /// stdin: a FIFO path or empty.
    pub stdin: String,
    /// stdout: a FIFO path, `file://` or `binary://` URI, or empty.
    pub stdout: String,
    /// stderr: as stdout; ignored with a terminal (the pty merges both).
    pub stderr: String,
}

/// A readable endpoint (the container's stdin source).
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// A writable endpoint (where the container's output goes).
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The opened endpoints of one process.
#[derive(Default)]
pub struct OpenStdio {
    /// Source of the process's stdin.
    pub stdin: Option<Reader>,
    /// Destination of its stdout.
    pub stdout: Option<Writer>,
    /// Destination of its stderr.
    pub stderr: Option<Writer>,
    /// The logging binary, when a `binary://` URI was given; waited for after the streams close.
    pub logger: Option<tokio::process::Child>,
}

impl std::fmt::Debug for OpenStdio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenStdio")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("logger", &self.logger.as_ref().and_then(|c| c.id()))
            .finish()
    }
}

enum Target {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    Binary { path: PathBuf, args: Vec<String> },
}

fn parse(uri: &str) -> Result<Target, StdioError> {
    if uri.is_empty() {
        return Ok(Target::None);
    }
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(Target::File(PathBuf::from(percent_decode(rest))));
    }
    if let Some(rest) = uri.strip_prefix("binary://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            args.push(percent_decode(k));
            if !v.is_empty() {
                args.push(percent_decode(v));
            }
        }
        return Ok(Target::Binary {
            path: PathBuf::from(percent_decode(path)),
            args,
        });
    }
    if uri.starts_with('/') {
        return Ok(Target::Fifo(PathBuf::from(uri)));
    }
    if let Some(rest) = uri.strip_prefix("fifo://") {
        return Ok(Target::Fifo(PathBuf::from(rest)));
    }
    Err(StdioError::UnsupportedUri {
        uri: uri.to_string(),
    })
}

/// Decodes `%XX` escapes; malformed escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b, hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn open_fifo_writer(stream: &'static str, path: &Path) -> Result<Writer, StdioError> {
    // Opening read-write never fails with ENXIO when the reader has not opened its end yet
    // (Linux semantics for FIFOs); the reader containerd's client holds then sees our output.
    let sender = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(|source| StdioError::Open {
            stream,
            path: path.to_path_buf(),
            source,
        })?;
    grow_pipe(&sender);
    Ok(Box::new(sender))
}

/// Capacity asked for the FIFOs the shim writes a process's output into: a bigger pipe lets
/// each copy move more bytes per system call and wake the reader less often (64 KiB is
/// Linux's default; 1 MiB is the most an unprivileged process may ask for).
const FIFO_BYTES: i32 = 1 << 20;

/// Best effort: a pipe that cannot grow (an administrator lowered `fs.pipe-max-size`) keeps
/// working at its current size.
fn grow_pipe(fd: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(FIFO_BYTES));
}

fn open_file_writer(stream: &'static str, path: &Path) -> Result<Writer, StdioError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StdioError::Open {
            stream,
            path: path.to_path_buf(),
            source,
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| StdioError::Open {
            stream,
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Box::new(tokio::fs::File::from_std(file)))
}

/// Opens the endpoints named by `uris` for the process `id` in containerd namespace `namespace`.
///
/// With `terminal`, stderr is not opened: the pty carries both streams on stdout.
///
/// # Errors
///
/// Any [`StdioError`]; endpoints opened before the failure are closed again.
pub async fn open_stdio(
    uris: &StdioUris,
    terminal: bool,
    id: &str,
    namespace: &str,
) -> Result<OpenStdio, StdioError> {
    let mut out = OpenStdio::default();
    match parse(&uris.stdin)? {
        Target::None => {}
        Target::Fifo(path) => {
            let receiver = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&path)
                .map_err(|source| StdioError::Open {
                    stream: "stdin",
                    path,
                    source,
                })?;
            out.stdin = Some(Box::new(receiver));
        }
        _ => {
            return Err(StdioError::UnsupportedUri {
                uri: uris.stdin.clone(),
            });
        }
    }
    let stderr_uri = if terminal { "" } else { uris.stderr.as_str() };
    match (parse(&uris.stdout)?, parse(stderr_uri)?) {
        (Target::Binary { path, args }, _) => {
            let (stdout, stderr, child) = spawn_logger(&path, &args, id, namespace).await?;
            out.stdout = Some(stdout);
            out.stderr = (!terminal).then_some(stderr);
            out.logger = Some(child);
        }
        (stdout, stderr) => {
            out.stdout = open_writer("stdout", stdout)?;
            out.stderr = open_writer("stderr", stderr)?;
        }
    }
    Ok(out)
}

fn open_writer(stream: &'static str, target: Target) -> Result<Option<Writer>, StdioError> {
    match target {
        Target::None => Ok(None),
        Target::Fifo(path) => open_fifo_writer(stream, &path).map(Some),
        Target::File(path) => open_file_writer(stream, &path).map(Some),
        // A logging binary is started once, from the stdout URI.
        Target::Binary { path, .. } => Err(StdioError::UnsupportedUri {
            uri: format!("binary://{}", path.display()),
        }),
    }
}

fn pipe_pair(path: &Path) -> Result<(OwnedFd, OwnedFd), StdioError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| StdioError::Pipe {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

async fn spawn_logger(
    path: &Path,
    args: &[String],
    id: &str,
    namespace: &str,
) -> Result<(Writer, Writer, tokio::process::Child), StdioError> {
    let (out_r, out_w) = pipe_pair(path)?;
    let (err_r, err_w) = pipe_pair(path)?;
    let (ready_r, ready_w) = pipe_pair(path)?;
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(ProcStdio::null())
        .stdout(ProcStdio::null())
        .stderr(ProcStdio::null());
    let mappings = [(out_r, 3), (err_r, 4), (ready_w, 5)]
        .into_iter()
        .map(|(parent_fd, child_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    cmd.fd_mappings(mappings).map_err(|e| StdioError::Pipe {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    let mut child = cmd.spawn().map_err(|source| StdioError::SpawnLogger {
        path: path.to_path_buf(),
        source,
    })?;
    // The child holds its copies; the command (and our ends of those pipes) go away here.
    drop(cmd);
    // The binary closes fd 5 when it is ready; EOF on our end is the signal.
    let mut ready = tokio::fs::File::from_std(std::fs::File::from(ready_r));
    let mut buf = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(&mut ready, &mut buf).await;
    if let Ok(Some(_)) = child.try_wait() {
        return Err(StdioError::LoggerNotReady {
            path: path.to_path_buf(),
        });
    }
    let stdout = pipe::Sender::from_owned_fd(out_w).map_err(|e| StdioError::Pipe {
        path: path.to_path_buf(),
        source: e,
    })?;
    let stderr = pipe::Sender::from_owned_fd(err_w).map_err(|e| StdioError::Pipe {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok((Box::new(stdout), Box::new(stderr), child))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("squib-stdio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_parse_binary_uri_query_becomes_args() {
        match parse("binary:///usr/bin/logger?level=info&json&path=%2Fvar%2Flog").unwrap() {
            Target::Binary { path, args } => {
                assert_eq!(path, PathBuf::from("/usr/bin/logger"));
                assert_eq!(args, ["level", "info", "json", "path", "/var/log"]);
            }
            _ => panic!("not a binary target"),
        }
        assert!(matches!(
            parse("tcp://x"),
            Err(StdioError::UnsupportedUri { .. })
        ));
        assert!(matches!(parse("").unwrap(), Target::None));
    }

    #[tokio::test]
    async fn test_open_stdio_fifos_carry_bytes_both_ways() {
        let d = tempdir("fifo");
        for name in ["in", "out", "err"] {
            nix::unistd::mkfifo(
                &d.join(name),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .unwrap();
        }
        let uris = StdioUris {
            stdin: d.join("in").display().to_string(),
            stdout: d.join("out").display().to_string(),
            stderr: d.join("err").display().to_string(),
        };
        let mut io = open_stdio(&uris, false, "c1", "default").await.unwrap();
        // The client's ends.
        let mut client_in = pipe::OpenOptions::new().open_sender(d.join("in")).unwrap();
        let mut client_out = pipe::OpenOptions::new()
            .open_receiver(d.join("out"))
            .unwrap();
        client_in.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.stdin
            .as_mut()
            .unwrap()
            .read_exact(&mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"ping");
        io.stdout
            .as_mut()
            .unwrap()
            .write_all(b"pong")
            .await
            .unwrap();
        client_out.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // The output FIFOs were grown, so a bulk copy moves more per system call.
        let size = nix::fcntl::fcntl(&client_out, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap();
        let max: i32 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(size >= FIFO_BYTES.min(max), "stdout FIFO capacity {size}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn test_open_stdio_file_uri_appends_both_streams() {
        let d = tempdir("file");
        let log = d.join("logs/c.log");
        let uri = format!("file://{}", log.display());
        let uris = StdioUris {
            stdin: String::new(),
            stdout: uri.clone(),
            stderr: uri,
        };
        let mut io = open_stdio(&uris, false, "c1", "default").await.unwrap();
        io.stdout
            .as_mut()
            .unwrap()
            .write_all(b"out\n")
            .await
            .unwrap();
        io.stdout.as_mut().unwrap().flush().await.unwrap();
        io.stderr
            .as_mut()
            .unwrap()
            .write_all(b"err\n")
            .await
            .unwrap();
        io.stderr.as_mut().unwrap().flush().await.unwrap();
        drop(io);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn test_open_stdio_binary_logger_gets_fds_and_env() {
        let d = tempdir("bin");
        let script = d.join("logger.sh");
        let result = d.join("result");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\ncat <&3 > {r}.out\ncat <&4 > {r}.err\n\
                 echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $*\" > {r}.env\n",
                r = result.display()
            ),
        )
        .unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&script).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?mode=test", script.display());
        let uris = StdioUris {
            stdin: String::new(),
            stdout: uri.clone(),
            stderr: uri,
        };
        let mut io = open_stdio(&uris, false, "c9", "ns1").await.unwrap();
        io.stdout
            .as_mut()
            .unwrap()
            .write_all(b"hello")
            .await
            .unwrap();
        io.stderr
            .as_mut()
            .unwrap()
            .write_all(b"oops")
            .await
            .unwrap();
        let mut child = io.logger.take().unwrap();
        drop(io);
        assert!(child.wait().await.unwrap().success());
        let read =
            |ext: &str| std::fs::read_to_string(format!("{}.{ext}", result.display())).unwrap();
        assert_eq!(read("out"), "hello");
        assert_eq!(read("err"), "oops");
        assert_eq!(read("env").trim(), "c9 ns1 mode test");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
