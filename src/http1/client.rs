//! The client streams the hand-written path carries: plain TCP (Pingora's `l4::Stream`) and,
//! behind a TLS listener, the TLS stream over it. After the handshake a TLS connection is a
//! byte stream like any other; what differs is how the bytes already read are put back in
//! front of it when a request is handed to Pingora: a TCP stream takes them back itself
//! ([`L4Stream::rewind`]), a TLS stream is wrapped in [`Rewound`], which serves them first.

use std::fmt::Debug;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN, IO,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client stream the hand-written path can read, write and lend to Pingora.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    /// The stream as Pingora takes it, `unread` put back in front of it.
    fn lend(self: Box<Self>, unread: &[u8]) -> Stream;
    /// The stream back from Pingora, when it is still this kind.
    fn take_back(stream: Stream) -> Option<Box<Self>>;
}

impl ClientStream for L4Stream {
    fn lend(mut self: Box<Self>, unread: &[u8]) -> Stream {
        self.rewind(unread);
        self
    }

    fn take_back(stream: Stream) -> Option<Box<Self>> {
        stream.into_any().downcast().ok()
    }
}

/// A stream with bytes put back in front of it: they are read first, then the stream's own.
#[derive(Debug)]
pub struct Rewound<S> {
    inner: S,
    front: Vec<u8>,
    /// How much of `front` has been read.
    taken: usize,
}

impl<S> Rewound<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            front: Vec::new(),
            taken: 0,
        }
    }

    /// The stream itself (TLS: its negotiated protocol, its digests).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: IO + 'static> ClientStream for Rewound<S> {
    fn lend(mut self: Box<Self>, unread: &[u8]) -> Stream {
        if !unread.is_empty() {
            // Whatever was put back before and not read yet comes after what was read since.
            let rest = self.front.split_off(self.taken);
            self.front.clear();
            self.front.extend_from_slice(unread);
            self.front.extend_from_slice(&rest);
            self.taken = 0;
        }
        self
    }

    fn take_back(stream: Stream) -> Option<Box<Self>> {
        stream.into_any().downcast().ok()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.taken < this.front.len() {
            let n = (this.front.len() - this.taken).min(buf.remaining());
            buf.put_slice(&this.front[this.taken..this.taken + n]);
            this.taken += n;
            if this.taken == this.front.len() {
                this.front = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl<S: Shutdown + Send> Shutdown for Rewound<S> {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl<S: UniqueID> UniqueID for Rewound<S> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl<S: Ssl> Ssl for Rewound<S> {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl<S: GetTimingDigest> GetTimingDigest for Rewound<S> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl<S: GetProxyDigest> GetProxyDigest for Rewound<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl<S: GetSocketDigest> GetSocketDigest for Rewound<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

/// Peeking is not offered: Pingora asks only on connections it accepted itself.
#[async_trait]
impl<S: Send> Peek for Rewound<S> {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_put_back_come_first_then_the_streams_own() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut rewound = Rewound::new(client);
        server.write_all(b"world").await.unwrap();
        rewound.front = b"hello ".to_vec();
        let mut got = vec![0; 11];
        rewound.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        assert!(rewound.front.is_empty());
    }
}
