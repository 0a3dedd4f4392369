//! `api/openapi.yaml` says what the code does: the same routes as the
//! router, and for every schema the same fields, the same required fields,
//! the same refusal of unknown fields and the same enum values as the serde
//! type behind it (read from the type by schemars, with serde's attributes).

use std::collections::BTreeSet;

use aivmm_api::openai;
use aivmm_api::server::ROUTES;
use aivmm_api::types;
use aivmm_api::ErrorCode;
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::Value;

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("api/openapi.yaml is readable");
    serde_yaml::from_str(&text).expect("api/openapi.yaml is valid YAML")
}

#[test]
fn the_document_has_exactly_the_routes_of_the_router() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(
        doc["info"]["version"],
        aivmm_api::API_VERSION,
        "info.version is the API's version"
    );
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
            if item.get(method).is_some() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes not in api/openapi.yaml: {missing:?}; documented routes the server lacks: {extra:?}"
    );
}

/// Which way a type crosses the wire: what a request may omit differs from
/// what a response always carries.
#[derive(Clone, Copy, Debug)]
enum Direction {
    Request,
    Response,
}

fn schema_of<T: JsonSchema>(direction: Direction) -> Value {
    let settings = match direction {
        Direction::Request => SchemaSettings::openapi3().for_deserialize(),
        Direction::Response => SchemaSettings::openapi3().for_serialize(),
    };
    settings
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

fn names(value: Option<&Value>) -> BTreeSet<String> {
    match value {
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// Enum values of a string enum schema (schemars writes `enum`, or `oneOf`
/// of `const`s / single-value enums when variants have doc comments).
fn enum_values(schema: &Value) -> BTreeSet<String> {
    if let Some(values) = schema.get("enum") {
        return names(Some(values));
    }
    let mut out = BTreeSet::new();
    for variant in schema
        .get("oneOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(value) = variant.get("const").and_then(Value::as_str) {
            out.insert(value.to_string());
        }
        out.extend(names(variant.get("enum")));
    }
    out
}

fn check<T: JsonSchema>(doc: &Value, name: &str, direction: Direction, problems: &mut Vec<String>) {
    let Some(documented) = doc["components"]["schemas"].get(name) else {
        problems.push(format!("{name}: no such schema in api/openapi.yaml"));
        return;
    };
    let code = schema_of::<T>(direction);
    let code_enum = enum_values(&code);
    if !code_enum.is_empty() {
        let doc_enum = names(documented.get("enum"));
        if doc_enum != code_enum {
            problems.push(format!(
                "{name}: enum {doc_enum:?} in the document, {code_enum:?} in the code"
            ));
        }
        return;
    }
    let doc_props = names(documented.get("properties"));
    let code_props = names(code.get("properties"));
    if doc_props != code_props {
        problems.push(format!(
            "{name}: properties only in the document {:?}, only in the code {:?}",
            doc_props.difference(&code_props).collect::<Vec<_>>(),
            code_props.difference(&doc_props).collect::<Vec<_>>()
        ));
    }
    let doc_required = names(documented.get("required"));
    let code_required = names(code.get("required"));
    if doc_required != code_required {
        problems.push(format!(
            "{name} ({direction:?}): required {doc_required:?} in the document, {code_required:?} in the code"
        ));
    }
    let strict = |schema: &Value| schema.get("additionalProperties") == Some(&Value::Bool(false));
    if strict(documented) != strict(&code) {
        problems.push(format!(
            "{name}: additionalProperties false is {} in the document and {} in the code (deny_unknown_fields)",
            strict(documented),
            strict(&code)
        ));
    }
}

#[test]
fn every_schema_has_the_fields_of_its_serde_type() {
    use Direction::{Request, Response};
    let doc = document();
    let mut problems = Vec::new();
    let p = &mut problems;
    check::<types::PartitionSpec>(&doc, "PartitionSpec", Request, p);
    check::<types::PartitionState>(&doc, "PartitionState", Response, p);
    check::<types::PartitionInfo>(&doc, "PartitionInfo", Response, p);
    check::<types::PartitionCounters>(&doc, "PartitionCounters", Response, p);
    check::<types::LinuxSpec>(&doc, "LinuxSpec", Request, p);
    check::<types::BootProtocol>(&doc, "BootProtocol", Request, p);
    check::<types::LinuxDisk>(&doc, "LinuxDisk", Request, p);
    check::<types::PartitionKind>(&doc, "PartitionKind", Response, p);
    check::<types::LinuxStatus>(&doc, "LinuxStatus", Response, p);
    check::<types::LinuxExits>(&doc, "LinuxExits", Response, p);
    check::<types::ConsoleTail>(&doc, "ConsoleTail", Response, p);
    check::<types::DeviceInfo>(&doc, "DeviceInfo", Response, p);
    check::<types::ModelSwap>(&doc, "ModelSwap", Request, p);
    check::<types::ModelRegistration>(&doc, "ModelRegistration", Request, p);
    check::<types::ModelInfo>(&doc, "ModelInfo", Response, p);
    check::<types::Sampling>(&doc, "Sampling", Request, p);
    check::<types::CompletionRequest>(&doc, "CompletionRequest", Request, p);
    check::<types::FinishReason>(&doc, "FinishReason", Response, p);
    check::<types::CompletionResult>(&doc, "CompletionResult", Response, p);
    check::<types::TokenEvent>(&doc, "TokenEvent", Response, p);
    check::<types::Health>(&doc, "Health", Response, p);
    check::<types::Version>(&doc, "Version", Response, p);
    check::<types::Stats>(&doc, "Stats", Response, p);
    check::<types::PartitionStats>(&doc, "PartitionStats", Response, p);
    check::<types::Percentiles>(&doc, "Percentiles", Response, p);
    check::<types::ErrorBody>(&doc, "ErrorBody", Response, p);
    check::<types::ErrorDetail>(&doc, "ErrorDetail", Response, p);
    check::<openai::StreamOptions>(&doc, "StreamOptions", Request, p);
    check::<openai::CompletionRequest>(&doc, "OpenAICompletionRequest", Request, p);
    check::<openai::ContentPart>(&doc, "ContentPart", Request, p);
    check::<openai::ChatMessage>(&doc, "ChatMessage", Request, p);
    check::<openai::ChatCompletionRequest>(&doc, "ChatCompletionRequest", Request, p);
    check::<openai::Usage>(&doc, "Usage", Response, p);
    check::<openai::CompletionChoice>(&doc, "CompletionChoice", Response, p);
    check::<openai::CompletionResponse>(&doc, "OpenAICompletionResponse", Response, p);
    check::<openai::AssistantMessage>(&doc, "AssistantMessage", Response, p);
    check::<openai::ChatChoice>(&doc, "ChatChoice", Response, p);
    check::<openai::ChatCompletionResponse>(&doc, "ChatCompletionResponse", Response, p);
    check::<openai::Delta>(&doc, "Delta", Response, p);
    check::<openai::ChatChunkChoice>(&doc, "ChatChunkChoice", Response, p);
    check::<openai::ChatCompletionChunk>(&doc, "ChatCompletionChunk", Response, p);
    check::<openai::ModelObject>(&doc, "ModelObject", Response, p);
    check::<openai::ModelList>(&doc, "ModelList", Response, p);
    assert!(
        problems.is_empty(),
        "api/openapi.yaml and the code disagree:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_documented_error_codes_are_the_codes_of_the_code() {
    let doc = document();
    let documented =
        names(doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"].get("enum"));
    let code: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect();
    assert_eq!(documented, code);
}

#[test]
fn the_chat_roles_are_the_documented_ones() {
    let doc = document();
    let documented =
        names(doc["components"]["schemas"]["ChatMessage"]["properties"]["role"].get("enum"));
    let code = enum_values(&schema_of::<openai::Role>(Direction::Request));
    assert_eq!(documented, code);
}
