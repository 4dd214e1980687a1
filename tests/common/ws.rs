//! A WebSocket client (tungstenite) for the tests of `/ws_task`.

use super::Server;
use serde_json::Value;
use std::net::TcpStream;
use std::time::Duration;
use tungstenite::{client::IntoClientRequest, Message, WebSocket};

pub type Ws = WebSocket<TcpStream>;

pub fn connect(
    s: &Server,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tungstenite::Error> {
    let url = format!("ws://127.0.0.1:{}/ws_task{query}", s.port);
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let stream = TcpStream::connect(("127.0.0.1", s.port)).expect("tcp");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
    }
}

pub fn send(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).expect("send");
}

/// Next text frame as JSON (pongs and pings skipped).
pub fn next(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("read a frame") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}
