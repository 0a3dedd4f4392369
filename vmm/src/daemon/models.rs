//! The models the daemon knows: GGUF files found in the model store at
//! start, models registered through the API, and `default` (the project's
//! default model, fetched and verified on first use). Each is described from
//! its GGUF header (architecture, size, quantization, context length).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aivmm_api::types::{validate_model_name, ModelInfo};
use aivmm_api::{ApiError, ErrorCode};

use crate::host_engine::MappedModel;
use crate::model_store;

/// The name under which the default model is known.
pub const DEFAULT_NAME: &str = "default";

pub struct ModelRegistry {
    models: BTreeMap<String, ModelInfo>,
}

/// Reads what `GET /models` shows from the file's GGUF header (the file is
/// mapped, not read; only the header pages are touched).
pub fn describe(name: &str, path: &Path) -> Result<ModelInfo, ApiError> {
    let path = &std::fs::canonicalize(path).map_err(|error| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("cannot open the model {}: {error}", path.display()),
        )
    })?;
    let invalid = |why: String| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{} is not a usable model: {why}", path.display()),
        )
    };
    let mapped = MappedModel::open(path).map_err(|e| invalid(e.to_string()))?;
    let gguf = mapped.parse().map_err(|e| invalid(e.to_string()))?;
    let architecture = gguf
        .get_str("general.architecture")
        .ok_or_else(|| invalid("no general.architecture in its metadata".into()))?
        .to_string();
    let key_u64 = |key: &str| {
        gguf.get(&format!("{architecture}.{key}"))
            .and_then(|value| value.as_u64())
            .unwrap_or(0)
    };
    let mut bytes_by_type: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut parameters = 0u64;
    for tensor in gguf.tensors() {
        parameters += tensor.n_elements();
        *bytes_by_type.entry(tensor.ty.name()).or_default() += tensor.data.len() as u64;
    }
    let quantization = gguf
        .get("general.file_type")
        .and_then(|value| value.as_u64())
        .and_then(file_type_name)
        .map(str::to_string)
        .unwrap_or_else(|| {
            // No (or an unknown) file type: name the type holding most bytes.
            bytes_by_type
                .iter()
                .max_by_key(|(_, bytes)| **bytes)
                .map_or("none", |(name, _)| name)
                .to_string()
        });
    let vocab_size = gguf
        .get_array("tokenizer.ggml.tokens")
        .map_or(0, |tokens| tokens.len() as u64);
    Ok(ModelInfo {
        name: name.into(),
        path: path.display().to_string(),
        display_name: gguf.get_str("general.name").map(str::to_string),
        size_bytes: mapped.bytes().len() as u64,
        quantization,
        parameters,
        context_length: key_u64("context_length"),
        layers: key_u64("block_count"),
        vocab_size,
        architecture,
        used_by: Vec::new(),
    })
}

/// llama.cpp's name for a `general.file_type` (`enum llama_ftype`), the
/// quantization mix a file was made with ("Q4_K_M" keeps some tensors in
/// Q6_K or Q8_0, so no single tensor type names it).
fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

impl ModelRegistry {
    /// The registry with every `*.gguf` of `store` (named by file stem; a
    /// file that is not a usable model is reported and skipped) and the
    /// models given on the command line.
    pub fn new(store: Option<&Path>, given: &[(String, PathBuf)]) -> ModelRegistry {
        let mut registry = ModelRegistry {
            models: BTreeMap::new(),
        };
        if let Some(store) = store {
            let mut files: Vec<PathBuf> = std::fs::read_dir(store)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "gguf"))
                .collect();
            files.sort();
            for path in files {
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                if validate_model_name(name).is_err() {
                    continue;
                }
                match describe(name, &path) {
                    Ok(info) => {
                        registry.models.insert(name.into(), info);
                    }
                    Err(error) => eprintln!("aivmm serve: skipping {}: {error}", path.display()),
                }
            }
        }
        for (name, path) in given {
            match describe(name, path) {
                Ok(info) => {
                    registry.models.insert(name.clone(), info);
                }
                Err(error) => eprintln!("aivmm serve: skipping model {name}: {error}"),
            }
        }
        registry
    }

    pub fn list(&self) -> Vec<ModelInfo> {
        self.models.values().cloned().collect()
    }

    pub fn register(&mut self, name: &str, path: &Path) -> Result<ModelInfo, ApiError> {
        validate_model_name(name).map_err(|why| ApiError::invalid("name", why))?;
        if name == DEFAULT_NAME {
            return Err(ApiError::invalid(
                "name",
                "\"default\" is reserved for the default model",
            ));
        }
        if let Some(known) = self.models.get(name) {
            if Path::new(&known.path) != path {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("model {name} is already registered for {}", known.path),
                ));
            }
        }
        if !path.is_file() {
            return Err(ApiError::invalid(
                "path",
                format!("{} is not a file", path.display()),
            ));
        }
        let info = describe(name, path).map_err(|mut e| {
            e.param = Some("path".into());
            e
        })?;
        self.models.insert(name.into(), info.clone());
        Ok(info)
    }

    /// The model a partition asks for: a registered name, `default`
    /// (fetched on first use) or an absolute path to a GGUF file.
    pub fn resolve(&mut self, reference: &str, param: &str) -> Result<ModelInfo, ApiError> {
        if let Some(info) = self.models.get(reference) {
            return Ok(info.clone());
        }
        if reference == DEFAULT_NAME {
            let path = model_store::fetch(model_store::DEFAULT_MODEL).map_err(|error| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot obtain the default model: {error}"),
                )
            })?;
            let info = describe(DEFAULT_NAME, &path)?;
            self.models.insert(DEFAULT_NAME.into(), info.clone());
            return Ok(info);
        }
        if reference.starts_with('/') {
            let path = Path::new(reference);
            if !path.is_file() {
                return Err(ApiError::invalid(
                    param,
                    format!("{reference} is not a file"),
                ));
            }
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|name| validate_model_name(name).is_ok())
                .unwrap_or("model");
            return describe(name, path).map_err(|mut e| {
                e.param = Some(param.into());
                e
            });
        }
        let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
        Err(ApiError {
            code: ErrorCode::NotFound,
            message: format!(
                "{param}: no model {reference:?}; known models: {} (or \"default\", or an absolute path to a GGUF file; register one with POST /models)",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ),
            param: Some(param.into()),
        })
    }
}
