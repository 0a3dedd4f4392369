//! What the API server asks of the daemon: one typed request per operation,
//! sent over a channel, each with a one-shot reply (Firecracker's
//! `VmmAction`, in tokio channels). The daemon side never sees HTTP; the
//! server side never touches a partition.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::types::*;

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// The sending end the server holds.
pub type RequestSender = mpsc::UnboundedSender<ApiRequest>;

pub enum ApiRequest {
    Health(Reply<Health>),
    ListPartitions(Reply<Vec<PartitionInfo>>),
    CreatePartition(PartitionSpec, Reply<PartitionInfo>),
    GetPartition(String, Reply<PartitionInfo>),
    PartitionAction(String, PartitionAction, Reply<PartitionInfo>),
    DeletePartition(String, Reply<()>),
    SwapModel(String, ModelSwap, Reply<PartitionInfo>),
    /// The last `bytes` bytes (at most) of a Linux partition's console log.
    Console(String, u64, Reply<ConsoleTail>),
    ListDevices(Reply<Vec<DeviceInfo>>),
    ListModels(Reply<Vec<ModelInfo>>),
    RegisterModel(ModelRegistration, Reply<ModelInfo>),
    Complete(Box<CompletionJob>, Reply<CompletionStream>),
    Stats(Reply<Stats>),
    /// Prometheus text exposition format.
    Metrics(Reply<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionAction {
    Start,
    Stop,
    Restart,
}

/// Where a completion goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Partition(String),
    /// OpenAI routes: a partition id, or a model name served by a running
    /// partition (the least busy one if several serve it).
    ModelName(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// The context as it is (special tokens recognised).
    Text(String),
    /// A conversation, rendered in the model's chat format with the
    /// assistant's turn opened.
    Chat(Vec<(ChatRole, String)>),
}

#[derive(Debug, Clone)]
pub struct CompletionJob {
    pub target: Target,
    pub prompt: Prompt,
    /// None: until end of generation or a full context.
    pub max_tokens: Option<u32>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub received: Instant,
}

/// A completion under way. Dropping `events` cancels it.
pub struct CompletionStream {
    pub partition: String,
    pub model: String,
    pub events: mpsc::UnboundedReceiver<StreamEvent>,
}

#[derive(Debug, Clone)]
pub enum StreamEvent {
    Text(String),
    Done(Box<CompletionResult>),
    /// The completion failed; nothing follows.
    Error(ApiError),
}

/// Stable error codes: clients may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A field has a bad value, or the body is not the JSON expected.
    InvalidRequest,
    /// The body has a field the API does not know.
    UnknownField,
    /// A parameter the engine cannot honour (n > 1, logprobs, ...).
    Unsupported,
    NotFound,
    MethodNotAllowed,
    AlreadyExists,
    /// The resource is in a state that does not allow this (e.g. a swap is
    /// already under way, or the partition is stopped).
    Conflict,
    /// Not enough cores, memory or hugepages: the message names which.
    ResourcesExhausted,
    /// The partition's request queue is full.
    QueueFull,
    /// The partition failed while serving this request, or would not boot.
    PartitionFailed,
    /// The partition was stopped or deleted while this request waited or ran.
    PartitionGone,
    Unauthorized,
    PayloadTooLarge,
    Timeout,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownField,
        ErrorCode::Unsupported,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::AlreadyExists,
        ErrorCode::Conflict,
        ErrorCode::ResourcesExhausted,
        ErrorCode::QueueFull,
        ErrorCode::PartitionFailed,
        ErrorCode::PartitionGone,
        ErrorCode::Unauthorized,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Timeout,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ResourcesExhausted => "resources_exhausted",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::PartitionFailed => "partition_failed",
            ErrorCode::PartitionGone => "partition_gone",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::UnknownField | ErrorCode::Unsupported => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => 409,
            ErrorCode::PartitionGone => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::QueueFull => 429,
            ErrorCode::Internal => 500,
            ErrorCode::PartitionFailed => 502,
            ErrorCode::ResourcesExhausted => 503,
            ErrorCode::Timeout => 504,
        }
    }

    /// OpenAI's error class for it.
    pub fn openai_type(self) -> &'static str {
        match self.http_status() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

/// An error the API answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            param: None,
        }
    }

    /// A bad value of the request field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: ErrorCode::InvalidRequest,
            message: format!("{param}: {}", message.into()),
            param: Some(param.into()),
        }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: ErrorCode::Unsupported,
            message: format!("{param}: {}", message.into()),
            param: Some(param.into()),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().into(),
                message: self.message.clone(),
                param: self.param.clone(),
                kind: self.code.openai_type().into(),
            },
        }
    }
}
