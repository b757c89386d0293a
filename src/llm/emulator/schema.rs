//! The JSON Schema subset used by structured output
//! (`output_config.format = {"type": "json_schema", "schema": …}`): a
//! light support check at request time, a validator, and a deterministic
//! generator of a value that conforms to a schema (objects with their
//! properties, strings within length bounds, integers and numbers within
//! `minimum` / `maximum`, arrays with `minItems`, `enum`, `const`, booleans,
//! `anyOf` / `oneOf` taking the first branch).

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::errors::ApiError;

/// Type names a schema may use.
const TYPES: [&str; 7] = [
    "object", "array", "string", "integer", "number", "boolean", "null",
];
/// Deepest nesting generated or validated.
const MAX_DEPTH: usize = 32;

/// Rejects a schema whose `type` is not a JSON Schema type name.
pub(super) fn check_supported(schema: &Map<String, Value>, path: &str) -> Result<(), ApiError> {
    let bad = |t: &Value| t.as_str().is_none_or(|t| !TYPES.contains(&t));
    let invalid = match schema.get("type") {
        None => false,
        Some(Value::Array(types)) => types.iter().any(bad),
        Some(t) => bad(t),
    };
    if invalid {
        return Err(ApiError::invalid(format!(
            "{path}.type: unsupported JSON Schema type"
        )));
    }
    Ok(())
}

/// Checks `value` against `schema`; the error names the first failing path.
pub(super) fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, "$", 0)
}

/// The schema's type: the first non-`null` one of a list.
fn type_of(schema: &Map<String, Value>) -> Option<&str> {
    match schema.get("type")? {
        Value::String(t) => Some(t),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or(Some("null")),
        _ => None,
    }
}

/// Whether `value` has JSON Schema type `name`.
fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

/// Recursive validation.
fn check(schema: &Value, value: &Value, path: &str, depth: usize) -> Result<(), String> {
    let Some(schema) = schema.as_object() else {
        return Ok(());
    };
    if depth > MAX_DEPTH {
        return Err(format!("{path}: nested too deeply"));
    }
    if let Some(branches) = schema
        .get("anyOf")
        .or(schema.get("oneOf"))
        .and_then(Value::as_array)
        && !branches
            .iter()
            .any(|b| check(b, value, path, depth + 1).is_ok())
    {
        return Err(format!("{path}: matches no anyOf/oneOf branch"));
    }
    check_type(schema, value, path)?;
    check_literals(schema, value, path)?;
    check_bounds(schema, value, path)?;
    match value {
        Value::Object(obj) => check_object(schema, obj, path, depth),
        Value::Array(items) => check_array(schema, items, path, depth),
        _ => Ok(()),
    }
}

/// `type` (a name or a list of names).
fn check_type(schema: &Map<String, Value>, value: &Value, path: &str) -> Result<(), String> {
    let ok = match schema.get("type") {
        None => true,
        Some(Value::String(t)) => has_type(value, t),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .any(|t| has_type(value, t)),
        Some(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{path}: expected type {}", schema["type"]))
    }
}

/// `enum` and `const`.
fn check_literals(schema: &Map<String, Value>, value: &Value, path: &str) -> Result<(), String> {
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!("{path}: not one of the enum values"));
    }
    if let Some(constant) = schema.get("const")
        && constant != value
    {
        return Err(format!("{path}: differs from const"));
    }
    Ok(())
}

/// Numeric bounds and string / array lengths.
fn check_bounds(schema: &Map<String, Value>, value: &Value, path: &str) -> Result<(), String> {
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    if let Some(x) = value.as_f64() {
        let low = num("minimum").is_some_and(|m| x < m)
            || num("exclusiveMinimum").is_some_and(|m| x <= m);
        let high = num("maximum").is_some_and(|m| x > m)
            || num("exclusiveMaximum").is_some_and(|m| x >= m);
        if low || high {
            return Err(format!("{path}: {x} is out of range"));
        }
    }
    let len = match value {
        Value::String(s) => Some((s.chars().count(), "minLength", "maxLength")),
        Value::Array(a) => Some((a.len(), "minItems", "maxItems")),
        _ => None,
    };
    if let Some((n, min_key, max_key)) = len {
        let n = n as f64;
        if num(min_key).is_some_and(|m| n < m) || num(max_key).is_some_and(|m| n > m) {
            return Err(format!("{path}: length {n} violates {min_key}/{max_key}"));
        }
    }
    Ok(())
}

/// `required`, `properties` and `additionalProperties: false`.
fn check_object(
    schema: &Map<String, Value>,
    obj: &Map<String, Value>,
    path: &str,
    depth: usize,
) -> Result<(), String> {
    let props = schema.get("properties").and_then(Value::as_object);
    if let Some(name) = required(schema).find(|name| !obj.contains_key(*name)) {
        return Err(format!("{path}.{name}: required"));
    }
    let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
    for (key, item) in obj {
        match props.and_then(|p| p.get(key)) {
            Some(sub) => check(sub, item, &format!("{path}.{key}"), depth + 1)?,
            None if closed => return Err(format!("{path}.{key}: not allowed")),
            None => {}
        }
    }
    Ok(())
}

/// `items`.
fn check_array(
    schema: &Map<String, Value>,
    items: &[Value],
    path: &str,
    depth: usize,
) -> Result<(), String> {
    let Some(item_schema) = schema.get("items") else {
        return Ok(());
    };
    for (i, item) in items.iter().enumerate() {
        check(item_schema, item, &format!("{path}[{i}]"), depth + 1)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Generation

/// A deterministic value conforming to `schema`, varied by `seed`.
pub(super) fn generate(schema: &Value, seed: &str) -> Value {
    gen_value(schema, seed, "", 0)
}

/// A number derived from the seed and the path.
fn pick(seed: &str, path: &str) -> u64 {
    let digest = Sha256::digest(format!("{seed}\u{0}{path}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(bytes)
}

/// Generation for one (sub)schema.
fn gen_value(schema: &Value, seed: &str, path: &str, depth: usize) -> Value {
    let Some(schema) = schema.as_object() else {
        return Value::Null;
    };
    if let Some(constant) = schema.get("const") {
        return constant.clone();
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.is_empty()
    {
        let i = usize::try_from(pick(seed, path) % options.len() as u64).unwrap_or(0);
        return options.get(i).cloned().unwrap_or(Value::Null);
    }
    if let Some(first) = schema
        .get("anyOf")
        .or(schema.get("oneOf"))
        .and_then(Value::as_array)
        .and_then(|b| b.first())
    {
        return gen_value(first, seed, path, depth + 1);
    }
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match type_of(schema) {
        Some("object") => gen_object(schema, seed, path, depth),
        Some("array") => gen_array(schema, seed, path, depth),
        Some("integer") => json!(gen_integer(schema, seed, path)),
        Some("number") => json!(gen_number(schema, seed, path)),
        Some("boolean") => Value::Bool(pick(seed, path).is_multiple_of(2)),
        Some("null") => Value::Null,
        Some("string") => Value::String(gen_string(schema, seed, path)),
        _ if schema.contains_key("properties") => gen_object(schema, seed, path, depth),
        _ => Value::String(gen_string(schema, seed, path)),
    }
}

/// Every declared property (required ones are always declared or added).
fn gen_object(schema: &Map<String, Value>, seed: &str, path: &str, depth: usize) -> Value {
    let mut out = Map::new();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let sub_path = format!("{path}.{name}");
            out.insert(name.clone(), gen_value(sub, seed, &sub_path, depth + 1));
        }
    }
    for name in required(schema) {
        if !out.contains_key(name) {
            out.insert(name.to_owned(), Value::String(format!("emulated {name}")));
        }
    }
    Value::Object(out)
}

/// `max(minItems, 1)` items, capped by `maxItems`.
fn gen_array(schema: &Map<String, Value>, seed: &str, path: &str, depth: usize) -> Value {
    let min = schema
        .get("minItems")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1);
    let count = schema
        .get("maxItems")
        .and_then(Value::as_u64)
        .map_or(min, |max| min.min(max));
    let item_schema = schema
        .get("items")
        .cloned()
        .unwrap_or(json!({"type": "string"}));
    let items = (0..count)
        .map(|i| gen_value(&item_schema, seed, &format!("{path}[{i}]"), depth + 1))
        .collect();
    Value::Array(items)
}

/// An integer within the bounds.
fn gen_integer(schema: &Map<String, Value>, seed: &str, path: &str) -> i64 {
    let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
    let low = bound("minimum")
        .map(|m| m.ceil())
        .or(bound("exclusiveMinimum").map(|m| m.floor() + 1.0))
        .unwrap_or(0.0);
    let high = bound("maximum")
        .map(|m| m.floor())
        .or(bound("exclusiveMaximum").map(|m| m.ceil() - 1.0))
        .unwrap_or(low + 100.0)
        .max(low);
    let span = (high - low) as u64 + 1;
    low as i64 + i64::try_from(pick(seed, path) % span.max(1)).unwrap_or(0)
}

/// A number within the bounds (an integer value, which every bound admits
/// unless the range is narrower than 1, when the midpoint is used).
fn gen_number(schema: &Map<String, Value>, seed: &str, path: &str) -> f64 {
    let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
    let low = bound("minimum")
        .or(bound("exclusiveMinimum"))
        .unwrap_or(0.0);
    let high = bound("maximum")
        .or(bound("exclusiveMaximum"))
        .unwrap_or(low + 100.0);
    if high - low < 2.0 {
        return (low + high) / 2.0;
    }
    let span = (high - low - 1.0).floor() as u64;
    low.floor() + 1.0 + (pick(seed, path) % span.max(1)) as f64
}

/// A readable string naming the field, padded / cut to the length bounds.
fn gen_string(schema: &Map<String, Value>, seed: &str, path: &str) -> String {
    let name = path.rsplit('.').next().unwrap_or("value");
    let mut text = match schema.get("format").and_then(Value::as_str) {
        Some("date") => "2026-12-01".to_owned(),
        Some("date-time") => "2026-12-01T12:00:00Z".to_owned(),
        Some("email") => "rep@example.com".to_owned(),
        Some("uuid") => "00000000-0000-4000-8000-000000000000".to_owned(),
        _ => format!("emulated {name} {}", pick(seed, path) % 1000),
    };
    let len = |k: &str| {
        schema
            .get(k)
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    };
    if let Some(min) = len("minLength") {
        while text.chars().count() < min {
            text.push('x');
        }
    }
    if let Some(max) = len("maxLength") {
        text = text.chars().take(max).collect();
    }
    text
}

/// The names an object schema's `required` lists.
fn required(schema: &Map<String, Value>) -> impl Iterator<Item = &str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}
