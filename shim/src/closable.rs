//! A stdin source that ends when the client says so.
//!
//! The shim opens the container's stdin FIFO read-write (so that it never sees end of file on
//! its own when the client's writer comes and goes); the client marks the real end of input
//! with `CloseIO`. By then every byte it wrote is already in the FIFO, so [`ClosableReader`]
//! keeps returning data until the FIFO is empty and only then reports end of file: the close
//! never overtakes input, and the copy loop behind it sends the exact byte count to the guest.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

#[derive(Debug, Default)]
struct Shared {
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

/// Ends a [`ClosableReader`] once it has drained what is readable.
#[derive(Debug, Clone, Default)]
pub struct StdinCloser(Arc<Shared>);

impl StdinCloser {
    /// Marks the end of input and wakes the reader.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        let waker = self.0.waker.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether [`StdinCloser::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::SeqCst)
    }
}

/// Wraps a reader; after [`StdinCloser::close`], a read that would wait returns end of file.
pub struct ClosableReader<R> {
    inner: R,
    shared: Arc<Shared>,
}

impl<R> std::fmt::Debug for ClosableReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClosableReader")
            .field("closed", &self.shared.closed.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl<R> ClosableReader<R> {
    /// Wraps `inner`; the returned closer ends it.
    pub fn new(inner: R) -> (Self, StdinCloser) {
        let closer = StdinCloser::default();
        (
            Self {
                inner,
                shared: closer.0.clone(),
            },
            closer,
        )
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ClosableReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                if let Ok(mut w) = this.shared.waker.lock() {
                    *w = Some(cx.waker().clone());
                }
                // Checked after registering the waker so a close in between is not missed.
                if this.shared.closed.load(Ordering::SeqCst) {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn test_closable_reader_drains_buffered_input_before_eof() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let (mut reader, closer) = ClosableReader::new(rx);
        let data = vec![7u8; 300_000];
        tx.write_all(&data).await.unwrap();
        closer.close();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), data.len());
        // The writer is still open: only the close ended the stream.
        drop(tx);
    }

    #[tokio::test]
    async fn test_closable_reader_wakes_a_waiting_read_on_close() {
        let (_tx, rx) = tokio::io::duplex(64);
        let (mut reader, closer) = ClosableReader::new(rx);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            reader.read(&mut buf).await.unwrap()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        closer.close();
        let n = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        assert!(closer.is_closed());
    }
}
