//! Loopback ports for servers that are not ours (mosquitto, a cloud that
//! is down). Our own gateway binds port 0 and reports what it got.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::WAIT;

/// A loopback port held by a socket that is bound but does not listen:
/// connections to it are refused (a cloud that is down), and no other
/// socket (a gateway's port 0 listener, another test's mosquitto) can take
/// it until [`ReservedPort::release`] hands it to the server meant for it.
pub struct ReservedPort {
    socket: TcpSocket,
    port: u16,
}

impl ReservedPort {
    pub fn new() -> ReservedPort {
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind a loopback port");
        let port = socket.local_addr().expect("its address").port();
        ReservedPort { socket, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Frees the port for the server that is about to bind it.
    pub fn release(self) -> u16 {
        drop(self.socket);
        self.port
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        ReservedPort::new()
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
