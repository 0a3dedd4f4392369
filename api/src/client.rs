//! A client of the daemon's Unix socket for the command line: one HTTP/1.1
//! request per call, JSON in and out, server-sent events handed over one by
//! one as they arrive.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path} (is `aivmm serve --api-sock {path}` running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("HTTP error talking to the daemon")]
    Http(#[from] hyper::Error),
    #[error("cannot build the HTTP request")]
    Request(#[from] hyper::http::Error),
    #[error("the daemon answered {status}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the daemon's answer is not the JSON expected")]
    Decode(#[source] serde_json::Error),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
}

pub struct Client {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty for none).
    pub event: String,
    pub data: String,
}

impl Client {
    pub fn new(socket: &Path) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Client {
            socket: socket.into(),
            runtime,
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        Ok(sender.send_request(request).await?)
    }

    /// The status and body of one request.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        self.runtime.block_on(async {
            let response = self.send(method, path, body).await?;
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await?.to_bytes();
            Ok((status, bytes.to_vec()))
        })
    }

    /// A JSON request; a non-2xx answer becomes [`ClientError::Api`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        let (status, bytes) = self.raw(method, path, body)?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            b"null".to_vec()
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// A request answered with server-sent events, each passed to `on_event`
    /// as it arrives.
    pub fn stream(
        &self,
        path: &str,
        body: &impl Serialize,
        on_event: &mut dyn FnMut(SseEvent),
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        self.runtime.block_on(async {
            let response = self.send("POST", path, Some(body)).await?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            if !(200..300).contains(&status) {
                let bytes = body.collect().await?.to_bytes();
                return Err(api_error(status, &bytes));
            }
            let mut pending = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.extend_from_slice(data);
                while let Some(end) = find(&pending, b"\n\n") {
                    let block: Vec<u8> = pending.drain(..end + 2).collect();
                    if let Some(event) = parse_event(&String::from_utf8_lossy(&block)) {
                        on_event(event);
                    }
                }
            }
            Ok(())
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = SseEvent {
        event: String::new(),
        data: String::new(),
    };
    let mut any = false;
    for line in block.lines() {
        if let Some(name) = line.strip_prefix("event:") {
            event.event = name.trim_start().to_string();
            any = true;
        } else if let Some(data) = line.strip_prefix("data:") {
            if !event.data.is_empty() {
                event.data.push('\n');
            }
            event.data.push_str(data.strip_prefix(' ').unwrap_or(data));
            any = true;
        }
    }
    any.then_some(event)
}

fn api_error(status: u16, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api {
            status,
            code: body.error.code,
            message: body.error.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: String::new(),
            message: String::from_utf8_lossy(bytes).trim().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed_from_their_lines() {
        let event = parse_event("event: token\ndata: {\"text\":\"a\"}\n\n").unwrap();
        assert_eq!(event.event, "token");
        assert_eq!(event.data, "{\"text\":\"a\"}");
        let event = parse_event("data: [DONE]\n\n").unwrap();
        assert_eq!(event.event, "");
        assert_eq!(event.data, "[DONE]");
        assert_eq!(parse_event(": comment\n\n"), None);
    }
}
