//! The HTTP server: HTTP/1.1 with keep-alive on the Unix socket (and on TCP
//! with a bearer token), bodies limited in size, slow clients timed out. Each
//! route checks its input, hands one [`ApiRequest`] to the daemon and turns
//! the reply into JSON, or into server-sent events for streamed completions.
//! Closing the connection of a streamed completion drops its event
//! receiver, which cancels the completion in the partition.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use futures_util::stream;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::openai;
use crate::request::*;
use crate::types::{self, *};

/// Every route: (method, path), as in `api/openapi.yaml` (a test keeps the
/// two and the router in step).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/version"),
    ("GET", "/partitions"),
    ("POST", "/partitions"),
    ("GET", "/partitions/{id}"),
    ("DELETE", "/partitions/{id}"),
    ("POST", "/partitions/{id}/start"),
    ("POST", "/partitions/{id}/stop"),
    ("POST", "/partitions/{id}/restart"),
    ("PUT", "/partitions/{id}/model"),
    ("POST", "/partitions/{id}/completions"),
    ("GET", "/partitions/{id}/console"),
    ("GET", "/devices"),
    ("GET", "/models"),
    ("POST", "/models"),
    ("GET", "/stats"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
];

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers (also the idle time of
    /// a kept-alive connection).
    pub header_timeout: Duration,
    /// Longest wait for the daemon on a control request.
    pub control_timeout: Duration,
    /// Longest wait for a partition to boot (create, start, restart, model swap).
    pub boot_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_secs(30),
            control_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(900),
            max_connections: 1024,
        }
    }
}

#[derive(Clone)]
struct AppState {
    daemon: RequestSender,
    options: Arc<ServerOptions>,
    version: Arc<Version>,
}

/// The routes, answering through `daemon`. With `token`, every request must
/// carry `Authorization: Bearer <token>` (the TCP listener).
pub fn router(
    daemon: RequestSender,
    version: Version,
    options: ServerOptions,
    token: Option<String>,
) -> Router {
    let max_body = options.max_body_bytes;
    let state = AppState {
        daemon,
        options: Arc::new(options),
        version: Arc::new(version),
    };
    let router = Router::new()
        .route("/health", get(health))
        .route("/version", get(version_info))
        .route("/partitions", get(list_partitions).post(create_partition))
        .route(
            "/partitions/{id}",
            get(get_partition).delete(delete_partition),
        )
        .route("/partitions/{id}/start", post(start_partition))
        .route("/partitions/{id}/stop", post(stop_partition))
        .route("/partitions/{id}/restart", post(restart_partition))
        .route("/partitions/{id}/model", put(swap_model))
        .route("/partitions/{id}/completions", post(partition_completion))
        .route("/partitions/{id}/console", get(console))
        .route("/devices", get(list_devices))
        .route("/models", get(list_models).post(register_model))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai_models))
        .route("/v1/completions", post(openai_completion))
        .route("/v1/chat/completions", post(openai_chat_completion))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state);
    match token {
        Some(token) => {
            let token: Arc<str> = token.into();
            router.layer(middleware::from_fn(move |req: Request, next: Next| {
                let token = token.clone();
                async move { require_token(&token, req, next).await }
            }))
        }
        None => router,
    }
}

/// Serves connections from `accept` until `shutdown` turns true.
pub async fn serve<S, F, Fut>(
    mut accept: F,
    app: Router,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let slots = Arc::new(Semaphore::new(options.max_connections));
    loop {
        let stream = tokio::select! {
            accepted = accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors and the like: say so, back off, go on.
                eprintln!("aivmm serve: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the limit: the connection is closed at once.
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let header_timeout = options.header_timeout;
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .max_buf_size(64 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A client that goes away mid-request is not the daemon's error.
            let _ = connection.await;
            drop(slot);
        });
    }
}

async fn require_token(token: &str, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => {
            let mut response = ApiError::new(
                ErrorCode::Unauthorized,
                "a bearer token is required: send 'Authorization: Bearer <token>' with the token of the daemon's --token-file",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &self.body())
    }
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => {
            let mut response = Response::new(Body::from(format!(
                "{{\"error\":{{\"code\":\"internal\",\"message\":\"cannot encode the answer: {error}\",\"param\":null,\"type\":\"server_error\"}}}}\n"
            )));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

fn ok<T: Serialize>(value: &T) -> Response {
    json_response(StatusCode::OK, value)
}

/// Parses a JSON body, naming the field at fault when it is not what the
/// API expects (unknown, missing, or of the wrong type or value).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(value) => value,
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let message = inner.to_string();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("the body is not valid JSON: {message}"),
                ));
            }
            if let Some(rest) = message.strip_prefix("unknown field `") {
                let name = rest.split('`').next().unwrap_or_default();
                // The path already ends with the unknown key.
                let param = if path == "." || !path.ends_with(name) {
                    name.to_string()
                } else {
                    path.clone()
                };
                return Err(ApiError {
                    code: ErrorCode::UnknownField,
                    message: format!(
                        "unknown field {param}: {}",
                        message.split(" at line").next().unwrap_or(&message)
                    ),
                    param: Some(param),
                });
            }
            if let Some(rest) = message.strip_prefix("missing field `") {
                let name = rest.split('`').next().unwrap_or_default();
                let param = if path == "." {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                };
                return Err(ApiError::invalid(&param, "is required"));
            }
            if path == "." {
                return Err(ApiError::new(ErrorCode::InvalidRequest, message));
            }
            return Err(ApiError::invalid(&path, message));
        }
    };
    deserializer.end().map_err(|error| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the body is not valid JSON: {error}"),
        )
    })?;
    Ok(value)
}

/// A JSON body, or an [`ApiError`] naming what is wrong with it.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    "the request body is larger than the daemon accepts (1 MiB by default)",
                )
            } else {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("cannot read the request body: {}", rejection.body_text()),
                )
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "the request needs a JSON body",
            ));
        }
        parse_json(&bytes).map(JsonBody)
    }
}

/// The `{id}` of a path.
struct PartitionId(String);

impl<S: Send + Sync> FromRequestParts<S> for PartitionId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|rejection: PathRejection| {
                    ApiError::invalid("id", rejection.body_text())
                })?;
        types::validate_partition_id(&id).map_err(|why| ApiError::invalid("id", why))?;
        Ok(PartitionId(id))
    }
}

/// Sends one request to the daemon and waits for its reply.
async fn ask<T>(
    state: &AppState,
    timeout: Duration,
    make: impl FnOnce(Reply<T>) -> ApiRequest,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    state
        .daemon
        .send(make(reply))
        .map_err(|_| ApiError::new(ErrorCode::Internal, "the daemon is shutting down"))?;
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(ApiError::new(
            ErrorCode::Internal,
            "the daemon dropped the request without an answer",
        )),
        Err(_) => Err(ApiError::new(
            ErrorCode::Timeout,
            format!(
                "the daemon did not answer within {} s; the operation may still complete: check GET /partitions",
                timeout.as_secs()
            ),
        )),
    }
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no route {} {}: see api/openapi.yaml for the routes",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{} is not allowed on {}: see api/openapi.yaml",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn health(State(state): State<AppState>) -> Result<Response, ApiError> {
    let health = ask(&state, state.options.control_timeout, ApiRequest::Health).await?;
    Ok(ok(&health))
}

async fn version_info(State(state): State<AppState>) -> Response {
    ok(&*state.version)
}

async fn list_partitions(State(state): State<AppState>) -> Result<Response, ApiError> {
    let list = ask(
        &state,
        state.options.control_timeout,
        ApiRequest::ListPartitions,
    )
    .await?;
    Ok(ok(&list))
}

async fn create_partition(
    State(state): State<AppState>,
    JsonBody(spec): JsonBody<PartitionSpec>,
) -> Result<Response, ApiError> {
    check_spec(&spec)?;
    let info = ask(&state, state.options.boot_timeout, |reply| {
        ApiRequest::CreatePartition(spec, reply)
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, &info))
}

fn check_spec(spec: &PartitionSpec) -> Result<(), ApiError> {
    types::validate_partition_id(&spec.id).map_err(|why| ApiError::invalid("id", why))?;
    match (&spec.model, &spec.linux) {
        (Some(model), None) if model.is_empty() => {
            return Err(ApiError::invalid(
                "model",
                "must name a model or a GGUF file",
            ))
        }
        (Some(_), None) => {
            if !spec.devices.is_empty() {
                return Err(ApiError::invalid(
                    "devices",
                    "only Linux partitions take PCI devices (give `linux` instead of `model`)",
                ));
            }
            if spec.context_length == Some(0) {
                return Err(ApiError::invalid("context_length", "must be at least 1"));
            }
        }
        (None, Some(linux)) => check_linux(linux, spec)?,
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "linux",
                "give either `model` (an inference partition) or `linux` (a Linux guest), not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "model",
                "give `model` (a model name or GGUF file) or `linux` (a kernel to boot)",
            ))
        }
    }
    if let Some(vcpus) = spec.vcpus {
        if !(1..=aivmm_guest_abi_max_vcpus()).contains(&vcpus) {
            return Err(ApiError::invalid(
                "vcpus",
                format!(
                    "{vcpus} is out of range 1..={}",
                    aivmm_guest_abi_max_vcpus()
                ),
            ));
        }
    }
    if let Some(cores) = &spec.cores {
        if cores.is_empty() {
            return Err(ApiError::invalid(
                "cores",
                "must list at least one host CPU",
            ));
        }
        if let Some(vcpus) = spec.vcpus {
            if vcpus as usize != cores.len() {
                return Err(ApiError::invalid(
                    "cores",
                    format!(
                        "{} CPU(s) for {vcpus} vCPU(s): give one CPU per vCPU",
                        cores.len()
                    ),
                ));
            }
        }
    }
    if spec.memory_mib == Some(0) {
        return Err(ApiError::invalid("memory_mib", "must be at least 1"));
    }
    Ok(())
}

fn check_linux(linux: &LinuxSpec, spec: &PartitionSpec) -> Result<(), ApiError> {
    if !linux.kernel.starts_with('/') {
        return Err(ApiError::invalid(
            "linux.kernel",
            "must be the absolute path of a vmlinux or bzImage",
        ));
    }
    if linux.initrd.as_deref().is_some_and(|p| !p.starts_with('/')) {
        return Err(ApiError::invalid(
            "linux.initrd",
            "must be an absolute path",
        ));
    }
    if linux.cmdline.as_deref().is_some_and(|c| c.contains('\0')) {
        return Err(ApiError::invalid(
            "linux.cmdline",
            "must not contain a NUL byte",
        ));
    }
    for (i, disk) in linux.disks.iter().enumerate() {
        if !disk.path.starts_with('/') {
            return Err(ApiError::invalid(
                "linux.disks",
                format!("{:?} must be an absolute path", disk.path),
            ));
        }
        if linux.disks[..i].iter().any(|other| other.path == disk.path) {
            return Err(ApiError::invalid(
                "linux.disks",
                format!("{} is listed twice", disk.path),
            ));
        }
    }
    if spec.context_length.is_some() {
        return Err(ApiError::invalid(
            "context_length",
            "is for models; a Linux partition has none",
        ));
    }
    for (i, device) in spec.devices.iter().enumerate() {
        if spec.devices[..i].contains(device) {
            return Err(ApiError::invalid(
                "devices",
                format!("{device} is listed twice"),
            ));
        }
    }
    Ok(())
}

/// The guest's vCPU limit (the ABI's `MAX_VCPUS`), mirrored here so the API
/// crate does not depend on the guest ABI; the daemon checks it again.
const fn aivmm_guest_abi_max_vcpus() -> u32 {
    64
}

async fn get_partition(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
) -> Result<Response, ApiError> {
    let info = ask(&state, state.options.control_timeout, |reply| {
        ApiRequest::GetPartition(id, reply)
    })
    .await?;
    Ok(ok(&info))
}

async fn delete_partition(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
) -> Result<Response, ApiError> {
    ask(&state, state.options.boot_timeout, |reply| {
        ApiRequest::DeletePartition(id, reply)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn partition_action(
    state: AppState,
    id: String,
    action: PartitionAction,
) -> Result<Response, ApiError> {
    let info = ask(&state, state.options.boot_timeout, |reply| {
        ApiRequest::PartitionAction(id, action, reply)
    })
    .await?;
    Ok(ok(&info))
}

async fn start_partition(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
) -> Result<Response, ApiError> {
    partition_action(state, id, PartitionAction::Start).await
}

async fn stop_partition(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
) -> Result<Response, ApiError> {
    partition_action(state, id, PartitionAction::Stop).await
}

async fn restart_partition(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
) -> Result<Response, ApiError> {
    partition_action(state, id, PartitionAction::Restart).await
}

async fn swap_model(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
    JsonBody(swap): JsonBody<ModelSwap>,
) -> Result<Response, ApiError> {
    if swap.model.is_empty() {
        return Err(ApiError::invalid(
            "model",
            "must name a model or a GGUF file",
        ));
    }
    if swap.context_length == Some(0) {
        return Err(ApiError::invalid("context_length", "must be at least 1"));
    }
    let info = ask(&state, state.options.boot_timeout, |reply| {
        ApiRequest::SwapModel(id, swap, reply)
    })
    .await?;
    Ok(ok(&info))
}

/// `?bytes=N` of the console route.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    bytes: Option<u64>,
}

/// Console bytes answered when `?bytes` is not given, and at most.
pub const CONSOLE_DEFAULT_BYTES: u64 = 16 << 10;
pub const CONSOLE_MAX_BYTES: u64 = 1 << 20;

async fn console(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
    query: Result<axum::extract::Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(query) =
        query.map_err(|rejection| ApiError::invalid("bytes", rejection.body_text()))?;
    let bytes = query.bytes.unwrap_or(CONSOLE_DEFAULT_BYTES);
    if !(1..=CONSOLE_MAX_BYTES).contains(&bytes) {
        return Err(ApiError::invalid(
            "bytes",
            format!("{bytes} is out of range 1..={CONSOLE_MAX_BYTES}"),
        ));
    }
    let tail = ask(&state, state.options.control_timeout, |reply| {
        ApiRequest::Console(id, bytes, reply)
    })
    .await?;
    Ok(ok(&tail))
}

async fn list_devices(State(state): State<AppState>) -> Result<Response, ApiError> {
    let devices = ask(
        &state,
        state.options.control_timeout,
        ApiRequest::ListDevices,
    )
    .await?;
    Ok(ok(&devices))
}

async fn list_models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let models = ask(
        &state,
        state.options.control_timeout,
        ApiRequest::ListModels,
    )
    .await?;
    Ok(ok(&models))
}

async fn register_model(
    State(state): State<AppState>,
    JsonBody(registration): JsonBody<ModelRegistration>,
) -> Result<Response, ApiError> {
    types::validate_model_name(&registration.name).map_err(|why| ApiError::invalid("name", why))?;
    if !registration.path.starts_with('/') {
        return Err(ApiError::invalid("path", "must be an absolute path"));
    }
    let info = ask(&state, state.options.control_timeout, |reply| {
        ApiRequest::RegisterModel(registration, reply)
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, &info))
}

async fn stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let stats = ask(&state, state.options.control_timeout, ApiRequest::Stats).await?;
    Ok(ok(&stats))
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = ask(&state, state.options.control_timeout, ApiRequest::Metrics).await?;
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

/// Checks sampling values, naming the field (`prefix` + name) at fault.
pub fn check_sampling(sampling: &Sampling, prefix: &str) -> Result<(), ApiError> {
    let field = |name: &str| format!("{prefix}{name}");
    if !(sampling.temperature.is_finite() && sampling.temperature >= 0.0) {
        return Err(ApiError::invalid(
            &field("temperature"),
            "must be a number >= 0",
        ));
    }
    if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        return Err(ApiError::invalid(&field("top_p"), "must be in (0, 1]"));
    }
    if !(0.0..=1.0).contains(&sampling.min_p) {
        return Err(ApiError::invalid(&field("min_p"), "must be in [0, 1]"));
    }
    if !(sampling.repeat_penalty.is_finite() && sampling.repeat_penalty > 0.0) {
        return Err(ApiError::invalid(
            &field("repeat_penalty"),
            "must be a number > 0",
        ));
    }
    Ok(())
}

fn check_stop(stop: &[String]) -> Result<(), ApiError> {
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop strings"));
    }
    if stop.iter().any(|s| s.is_empty() || s.chars().count() > 256) {
        return Err(ApiError::invalid(
            "stop",
            "each stop string must be 1 to 256 characters",
        ));
    }
    Ok(())
}

fn check_max_tokens(max_tokens: Option<u32>, name: &str) -> Result<(), ApiError> {
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(name, "must be at least 1"));
    }
    Ok(())
}

async fn partition_completion(
    State(state): State<AppState>,
    PartitionId(id): PartitionId,
    JsonBody(request): JsonBody<types::CompletionRequest>,
) -> Result<Response, ApiError> {
    check_sampling(&request.sampling, "sampling.")?;
    check_stop(&request.stop)?;
    check_max_tokens(Some(request.max_tokens), "max_tokens")?;
    if request.prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "must not be empty"));
    }
    let prompt = if request.chat {
        Prompt::Chat(vec![(ChatRole::User, request.prompt)])
    } else {
        Prompt::Text(request.prompt)
    };
    let job = CompletionJob {
        target: Target::Partition(id),
        prompt,
        max_tokens: Some(request.max_tokens),
        sampling: request.sampling,
        stop: request.stop,
        ignore_eos: request.ignore_eos,
        received: Instant::now(),
    };
    let completion = ask(&state, state.options.control_timeout, |reply| {
        ApiRequest::Complete(Box::new(job), reply)
    })
    .await?;
    if request.stream {
        Ok(sse_stream(completion.events, native_event))
    } else {
        let (_, result) = collect(completion.events).await?;
        Ok(ok(&result))
    }
}

/// One native server-sent event for a stream event.
fn native_event(event: StreamEvent) -> (Vec<Bytes>, bool) {
    let (name, data, last) = match event {
        StreamEvent::Text(text) => ("token", serde_json::to_string(&TokenEvent { text }), false),
        StreamEvent::Done(result) => ("done", serde_json::to_string(&*result), true),
        StreamEvent::Error(error) => ("error", serde_json::to_string(&error.body()), true),
    };
    let data = data.unwrap_or_else(|error| {
        format!("{{\"error\":{{\"code\":\"internal\",\"message\":\"cannot encode an event: {error}\",\"param\":null,\"type\":\"server_error\"}}}}")
    });
    (
        vec![Bytes::from(format!("event: {name}\ndata: {data}\n\n"))],
        last,
    )
}

fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Waits for the whole completion.
async fn collect(
    mut events: tokio::sync::mpsc::UnboundedReceiver<StreamEvent>,
) -> Result<(String, CompletionResult), ApiError> {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(StreamEvent::Text(piece)) => text.push_str(&piece),
            Some(StreamEvent::Done(result)) => return Ok((text, *result)),
            Some(StreamEvent::Error(error)) => return Err(error),
            None => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "the completion ended without a result",
                ))
            }
        }
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn completion_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}-{:x}{:06x}",
        unix_time(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn finish_reason(reason: FinishReason) -> String {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
    .into()
}

/// Fields both OpenAI routes treat alike.
struct OpenAiCommon {
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

#[allow(clippy::too_many_arguments)]
fn openai_common(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<openai::OneOrMany>,
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    stream: Option<bool>,
    stream_options: Option<openai::StreamOptions>,
) -> Result<OpenAiCommon, ApiError> {
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported(
            "n",
            "only one choice per request (n = 1)",
        ));
    }
    if presence_penalty.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported(
            "presence_penalty",
            "not supported; use repeat_penalty",
        ));
    }
    if frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported(
            "frequency_penalty",
            "not supported; use repeat_penalty",
        ));
    }
    let stream = stream.unwrap_or(false);
    if stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "only with stream: true",
        ));
    }
    // OpenAI's defaults: temperature 1 and no truncation but top_p.
    let sampling = Sampling {
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        top_k: top_k.unwrap_or(0),
        min_p: min_p.unwrap_or(0.0),
        repeat_penalty: repeat_penalty.unwrap_or(1.0),
        repeat_last_n: 64,
        seed: seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0x5eed, |d| d.as_nanos() as u64)
        }),
    };
    check_sampling(&sampling, "")?;
    let stop = stop.map(openai::OneOrMany::into_vec).unwrap_or_default();
    check_stop(&stop)?;
    Ok(OpenAiCommon {
        sampling,
        stop,
        stream,
        include_usage: stream_options.is_some_and(|o| o.include_usage),
    })
}

fn usage(result: &CompletionResult) -> openai::Usage {
    openai::Usage {
        prompt_tokens: result.prompt_tokens,
        completion_tokens: result.completion_tokens,
        total_tokens: result.prompt_tokens + result.completion_tokens,
    }
}

async fn openai_models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let partitions = ask(
        &state,
        state.options.control_timeout,
        ApiRequest::ListPartitions,
    )
    .await?;
    let created = unix_time();
    let mut data = Vec::new();
    let mut push = |id: &str| {
        if !data.iter().any(|m: &openai::ModelObject| m.id == id) {
            data.push(openai::ModelObject {
                id: id.into(),
                object: "model".into(),
                created,
                owned_by: "aivmm".into(),
            });
        }
    };
    // Completions are routed by a model a running partition serves, or by
    // the partition's id.
    for partition in partitions
        .iter()
        .filter(|p| p.state == PartitionState::Running && p.kind == PartitionKind::Inference)
    {
        push(&partition.model);
        push(&partition.id);
    }
    Ok(ok(&openai::ModelList {
        object: "list".into(),
        data,
    }))
}

async fn openai_completion(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<openai::CompletionRequest>,
) -> Result<Response, ApiError> {
    if request.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("best_of", "only best_of = 1"));
    }
    if request.logprobs.is_some() {
        return Err(ApiError::unsupported(
            "logprobs",
            "log probabilities are not returned",
        ));
    }
    if request.suffix.is_some() {
        return Err(ApiError::unsupported(
            "suffix",
            "insertion (suffix) is not supported",
        ));
    }
    let common = openai_common(
        request.temperature,
        request.top_p,
        request.top_k,
        request.min_p,
        request.repeat_penalty,
        request.seed,
        request.stop,
        request.n,
        request.presence_penalty,
        request.frequency_penalty,
        request.stream,
        request.stream_options,
    )?;
    let mut prompts = request.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::unsupported(
            "prompt",
            "exactly one prompt per request",
        ));
    }
    let prompt = prompts.remove(0);
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "must not be empty"));
    }
    let max_tokens = request.max_tokens.unwrap_or(16);
    check_max_tokens(Some(max_tokens), "max_tokens")?;
    let echo = request.echo.unwrap_or(false).then(|| prompt.clone());
    let job = CompletionJob {
        target: Target::ModelName(request.model),
        prompt: Prompt::Text(prompt),
        max_tokens: Some(max_tokens),
        sampling: common.sampling,
        stop: common.stop,
        ignore_eos: false,
        received: Instant::now(),
    };
    let completion = ask(&state, state.options.control_timeout, |reply| {
        ApiRequest::Complete(Box::new(job), reply)
    })
    .await?;
    let id = completion_id("cmpl");
    let created = unix_time();
    let model = completion.model.clone();
    if common.stream {
        let chunk = move |text: String, finish: Option<String>, usage: Option<openai::Usage>| {
            openai::CompletionResponse {
                id: id.clone(),
                object: "text_completion".into(),
                created,
                model: model.clone(),
                choices: if usage.is_some() && finish.is_none() {
                    Vec::new()
                } else {
                    vec![openai::CompletionChoice {
                        text,
                        index: 0,
                        logprobs: None,
                        finish_reason: finish,
                    }]
                },
                usage,
            }
        };
        let include_usage = common.include_usage;
        let mut echo = echo;
        let frames = move |event: StreamEvent| -> (Vec<Bytes>, bool) {
            match event {
                StreamEvent::Text(text) => {
                    let text = match echo.take() {
                        Some(prompt) => prompt + &text,
                        None => text,
                    };
                    (vec![sse_data(&chunk(text, None, None))], false)
                }
                StreamEvent::Done(result) => {
                    let mut frames = vec![sse_data(&chunk(
                        echo.take().unwrap_or_default(),
                        Some(finish_reason(result.finish_reason)),
                        None,
                    ))];
                    if include_usage {
                        frames.push(sse_data(&chunk(String::new(), None, Some(usage(&result)))));
                    }
                    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    (frames, true)
                }
                StreamEvent::Error(error) => (vec![sse_data(&error.body())], true),
            }
        };
        Ok(sse_stream(completion.events, frames))
    } else {
        let (text, result) = collect(completion.events).await?;
        let text = match echo {
            Some(prompt) => prompt + &text,
            None => text,
        };
        Ok(ok(&openai::CompletionResponse {
            id,
            object: "text_completion".into(),
            created,
            model,
            choices: vec![openai::CompletionChoice {
                text,
                index: 0,
                logprobs: None,
                finish_reason: Some(finish_reason(result.finish_reason)),
            }],
            usage: Some(usage(&result)),
        }))
    }
}

fn sse_data<T: Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_else(|error| {
        format!("{{\"error\":{{\"code\":\"internal\",\"message\":\"cannot encode a chunk: {error}\",\"param\":null,\"type\":\"server_error\"}}}}")
    });
    Bytes::from(format!("data: {json}\n\n"))
}

/// A response of server-sent events made by `frames` from the completion's
/// events (`frames` also says when the stream is over). The stream owns the
/// receiver: when the client goes away, hyper drops the body, the receiver
/// goes with it and the partition cancels the completion.
fn sse_stream(
    events: tokio::sync::mpsc::UnboundedReceiver<StreamEvent>,
    frames: impl FnMut(StreamEvent) -> (Vec<Bytes>, bool) + Send + 'static,
) -> Response {
    let chunks = stream::unfold(
        (events, frames, false),
        |(mut events, mut frames, done)| async move {
            if done {
                return None;
            }
            let event = events.recv().await.unwrap_or_else(|| {
                StreamEvent::Error(ApiError::new(
                    ErrorCode::Internal,
                    "the completion ended without a result",
                ))
            });
            let (out, last) = frames(event);
            let bytes: Bytes = out.concat().into();
            Some((Ok::<_, Infallible>(bytes), (events, frames, last)))
        },
    );
    sse_response(Body::from_stream(chunks))
}

async fn openai_chat_completion(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<openai::ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    if request.logprobs == Some(true) {
        return Err(ApiError::unsupported(
            "logprobs",
            "log probabilities are not returned",
        ));
    }
    let common = openai_common(
        request.temperature,
        request.top_p,
        request.top_k,
        request.min_p,
        request.repeat_penalty,
        request.seed,
        request.stop,
        request.n,
        request.presence_penalty,
        request.frequency_penalty,
        request.stream,
        request.stream_options,
    )?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "must hold at least one message",
        ));
    }
    let mut turns = Vec::with_capacity(request.messages.len());
    for (i, message) in request.messages.into_iter().enumerate() {
        let role = match message.role {
            openai::Role::System | openai::Role::Developer => ChatRole::System,
            openai::Role::User => ChatRole::User,
            openai::Role::Assistant => ChatRole::Assistant,
        };
        let content = match message.content {
            openai::Content::Text(text) => text,
            openai::Content::Parts(parts) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    if part.kind != "text" {
                        return Err(ApiError::unsupported(
                            &format!("messages[{i}].content[{j}].type"),
                            format!("{:?} content is not supported, only text", part.kind),
                        ));
                    }
                    text.push_str(&part.text);
                }
                text
            }
        };
        turns.push((role, content));
    }
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    check_max_tokens(request.max_tokens, "max_tokens")?;
    check_max_tokens(request.max_completion_tokens, "max_completion_tokens")?;
    let job = CompletionJob {
        target: Target::ModelName(request.model),
        prompt: Prompt::Chat(turns),
        max_tokens,
        sampling: common.sampling,
        stop: common.stop,
        ignore_eos: false,
        received: Instant::now(),
    };
    let completion = ask(&state, state.options.control_timeout, |reply| {
        ApiRequest::Complete(Box::new(job), reply)
    })
    .await?;
    let id = completion_id("chatcmpl");
    let created = unix_time();
    let model = completion.model.clone();
    if common.stream {
        let chunk =
            move |delta: openai::Delta, finish: Option<String>, usage: Option<openai::Usage>| {
                openai::ChatCompletionChunk {
                    id: id.clone(),
                    object: "chat.completion.chunk".into(),
                    created,
                    model: model.clone(),
                    choices: if usage.is_some() {
                        Vec::new()
                    } else {
                        vec![openai::ChatChunkChoice {
                            index: 0,
                            delta,
                            logprobs: None,
                            finish_reason: finish,
                        }]
                    },
                    usage,
                }
            };
        let include_usage = common.include_usage;
        let mut first = true;
        let frames = move |event: StreamEvent| -> (Vec<Bytes>, bool) {
            let mut frames = Vec::new();
            if first {
                first = false;
                let opening = openai::Delta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                };
                if !matches!(event, StreamEvent::Error(_)) {
                    frames.push(sse_data(&chunk(opening, None, None)));
                }
            }
            match event {
                StreamEvent::Text(text) => {
                    let delta = openai::Delta {
                        role: None,
                        content: Some(text),
                    };
                    frames.push(sse_data(&chunk(delta, None, None)));
                    (frames, false)
                }
                StreamEvent::Done(result) => {
                    frames.push(sse_data(&chunk(
                        openai::Delta::default(),
                        Some(finish_reason(result.finish_reason)),
                        None,
                    )));
                    if include_usage {
                        frames.push(sse_data(&chunk(
                            openai::Delta::default(),
                            None,
                            Some(usage(&result)),
                        )));
                    }
                    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    (frames, true)
                }
                StreamEvent::Error(error) => {
                    frames.push(sse_data(&error.body()));
                    (frames, true)
                }
            }
        };
        Ok(sse_stream(completion.events, frames))
    } else {
        let (text, result) = collect(completion.events).await?;
        Ok(ok(&openai::ChatCompletionResponse {
            id,
            object: "chat.completion".into(),
            created,
            model,
            choices: vec![openai::ChatChoice {
                index: 0,
                message: openai::AssistantMessage {
                    role: "assistant".into(),
                    content: text,
                },
                logprobs: None,
                finish_reason: finish_reason(result.finish_reason),
            }],
            usage: usage(&result),
        }))
    }
}
