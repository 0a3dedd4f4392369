//! aivmm's REST control API: the types of its resources ([`types`], and the
//! OpenAI-compatible ones in [`openai`]), the typed requests the HTTP server
//! hands the daemon ([`request`]), the server itself ([`server`]: HTTP/1.1 on
//! a Unix socket and optionally TCP with a bearer token) and a client for
//! the command line ([`client`]). The OpenAPI document is `api/openapi.yaml`.

pub mod client;
pub mod openai;
pub mod request;
pub mod server;
pub mod socket;
pub mod types;

pub use request::{ApiError, ApiRequest, ErrorCode};

/// Version of the API's paths and schemas (`info.version` of the OpenAPI document).
pub const API_VERSION: &str = "1.0.0";
