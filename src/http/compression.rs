//! Response compression: gzip at level 6 for compressible bodies over 1 KiB
//! (`COMPRESSION_MIN_BYTES`), when the client accepts gzip.
//!
//! A response is compressed when all of these hold:
//! - the request is not `HEAD`, and its `Accept-Encoding` gives `gzip` (or `x-gzip`, or `*`
//!   when gzip is not listed) a q-value above 0 and at least that of `identity` (an explicit
//!   `identity`, or `*`; `identity` unlisted counts as least preferred). No header means no
//!   compression;
//! - the response has no `Content-Encoding` or `Content-Range`, no `Cache-Control:
//!   no-transform`, and a compressible `Content-Type`: `text/*` (but not `text/event-stream`),
//!   `application/json`, `application/*+json`, `application/javascript`, `application/xml`,
//!   `application/*+xml`, `application/x-ndjson`, `image/svg+xml`;
//! - its body has a known length over the threshold ([`MIN_SIZE`] by default; streamed
//!   bodies, SSE among them, pass untouched as they come);
//! - the gzip output is smaller than the body.
//!
//! A compressed response gets `Content-Encoding: gzip`, its new `Content-Length`, a weak
//! `ETag` if it had a strong one, and `X-Compression-Ratio`: the original size divided by the
//! compressed size, with two decimals (`4.37` means the body shrank to 23 %). Every response
//! that could have been compressed (compressible type, over the threshold, not yet encoded)
//! carries `Vary: Accept-Encoding`, compressed or not, so caches keep the variants apart.

use axum::{
    body::{Body, Bytes, HttpBody as _},
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::Response,
};
use flate2::{Compression, write::GzEncoder};
use std::io::Write;

/// Bodies of this many bytes or fewer are sent as they are, unless `COMPRESSION_MIN_BYTES`
/// says otherwise.
pub const MIN_SIZE: usize = 1024;

/// The gzip level.
pub const LEVEL: u32 = 6;

/// `X-Compression-Ratio`: original size / compressed size, two decimals.
pub const X_COMPRESSION_RATIO: HeaderName = HeaderName::from_static("x-compression-ratio");

/// Bodies larger than this are compressed on the blocking pool, off the request threads.
const BLOCKING_ABOVE: usize = 64 * 1024;

/// The middleware (`axum::middleware::from_fn_with_state(min_size, compression::gzip)`):
/// bodies of `min_size` bytes or fewer are not compressed.
pub async fn gzip(State(min_size): State<usize>, request: Request, next: Next) -> Response {
    let head = request.method() == Method::HEAD;
    let accepted = !head && accepts_gzip(&request.headers().get_all(header::ACCEPT_ENCODING));
    let response = next.run(request).await;
    if head || !eligible(&response, min_size) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    add_vary(&mut parts.headers);
    if !accepted {
        return Response::from_parts(parts, body);
    }
    let original = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "reading a response body to compress it");
            let mut failed = Response::new(Body::empty());
            *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return failed;
        }
    };
    let compressed = if original.len() > BLOCKING_ABOVE {
        let input = original.clone();
        tokio::task::spawn_blocking(move || encode(&input))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "gzip task failed");
                Vec::new()
            })
    } else {
        encode(&original)
    };
    if compressed.is_empty() || compressed.len() >= original.len() {
        return Response::from_parts(parts, Body::from(original));
    }
    let headers = &mut parts.headers;
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(compressed.len()));
    let ratio = format!("{:.2}", original.len() as f64 / compressed.len() as f64);
    headers.insert(
        X_COMPRESSION_RATIO,
        HeaderValue::try_from(ratio).expect("digits"),
    );
    weaken_etag(headers);
    Response::from_parts(parts, Body::from(Bytes::from(compressed)))
}

/// gzip at [`LEVEL`]; empty on failure (never expected: the output is in memory).
pub fn encode(input: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(
        Vec::with_capacity(input.len() / 3 + 64),
        Compression::new(LEVEL),
    );
    match encoder.write_all(input).and_then(|()| encoder.finish()) {
        Ok(out) => out,
        Err(e) => {
            tracing::error!(error = %e, "gzip failed");
            Vec::new()
        }
    }
}

/// Whether `Accept-Encoding` lets the response be gzip (see the module docs).
pub fn accepts_gzip(values: &axum::http::header::GetAll<'_, HeaderValue>) -> bool {
    let (mut gzip, mut identity, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    for value in values {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for item in value.split(',') {
            let mut params = item.split(';');
            let coding = params
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            let q = params
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| parse_q(v));
            let slot = match coding.as_str() {
                "gzip" | "x-gzip" => &mut gzip,
                "identity" => &mut identity,
                "*" => &mut any,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |seen| seen.max(q)));
        }
    }
    let gzip = gzip.or(any).unwrap_or(0.0);
    let identity = identity.or(any).unwrap_or(0.0);
    gzip > 0.0 && gzip >= identity
}

/// A q-value (0 to 1, up to three decimals); anything malformed counts as 0 (not acceptable).
fn parse_q(raw: &str) -> f32 {
    match raw.trim().parse::<f32>() {
        Ok(q) if (0.0..=1.0).contains(&q) => q,
        _ => 0.0,
    }
}

/// Whether the response is one that gets compressed when the client accepts gzip.
fn eligible(response: &Response, min_size: usize) -> bool {
    let headers = response.headers();
    if headers.contains_key(header::CONTENT_ENCODING)
        || headers.contains_key(header::CONTENT_RANGE)
        || no_transform(headers)
        || !compressible(headers.get(header::CONTENT_TYPE))
    {
        return false;
    }
    // Unknown length: a stream (SSE, a large export) is passed on as it comes.
    response
        .body()
        .size_hint()
        .exact()
        .is_some_and(|len| len > min_size as u64)
}

fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
}

/// Whether a content type is worth compressing (text formats; not images, archives or
/// already-compressed formats, and not event streams).
pub fn compressible(content_type: Option<&HeaderValue>) -> bool {
    let Some(mime) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = mime
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some((kind, subtype)) = mime.split_once('/') else {
        return false;
    };
    match kind {
        "text" => subtype != "event-stream",
        "application" => {
            matches!(
                subtype,
                "json" | "javascript" | "ecmascript" | "xml" | "x-ndjson"
            ) || subtype.ends_with("+json")
                || subtype.ends_with("+xml")
        }
        "image" => subtype == "svg+xml",
        _ => false,
    }
}

/// Adds `Accept-Encoding` to `Vary` unless it is there (or `Vary: *`).
fn add_vary(headers: &mut HeaderMap) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|v| v == "*" || v.eq_ignore_ascii_case("accept-encoding"));
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// A strong ETag names the exact bytes, which compression changes: it becomes weak.
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
        return;
    };
    if etag.starts_with("W/") {
        return;
    }
    if let Ok(weak) = HeaderValue::try_from(format!("W/{etag}")) {
        headers.insert(header::ETAG, weak);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(values: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        accepts_gzip(&headers.get_all(header::ACCEPT_ENCODING))
    }

    #[test]
    fn accept_encoding_is_read_with_its_q_values() {
        assert!(accepts(&["gzip"]));
        assert!(accepts(&["br, GZIP;q=0.8"]));
        assert!(accepts(&["deflate", "gzip"]), "several header lines");
        assert!(accepts(&["x-gzip"]));
        assert!(accepts(&["*"]));
        assert!(accepts(&["*;q=0.5"]));
        assert!(
            accepts(&["gzip;q=0.5, identity;q=0.5"]),
            "a tie goes to gzip"
        );
        assert!(
            accepts(&["gzip;q=0.001"]),
            "identity unlisted is least preferred"
        );
        assert!(!accepts(&[]), "no header: identity");
        assert!(!accepts(&[""]));
        assert!(!accepts(&["identity"]));
        assert!(!accepts(&["br, deflate"]));
        assert!(!accepts(&["gzip;q=0"]));
        assert!(!accepts(&["gzip;q=0.000"]));
        assert!(!accepts(&["gzip; q=0, *"]), "an explicit refusal beats *");
        assert!(!accepts(&["*;q=0"]));
        assert!(
            !accepts(&["gzip;q=0.4, identity;q=0.9"]),
            "identity preferred"
        );
        assert!(!accepts(&["*;q=0.5, identity"]));
        assert!(!accepts(&["gzip;q=abc"]), "a malformed q is no acceptance");
        assert!(!accepts(&["gzip;q=2"]));
    }

    #[test]
    fn only_text_formats_are_compressible() {
        let c = |v: &str| compressible(Some(&HeaderValue::from_str(v).unwrap()));
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
            "text/plain; version=0.0.4",
            "text/html",
            "text/csv",
            "application/javascript",
            "application/xml",
            "application/atom+xml",
            "application/x-ndjson",
            "image/svg+xml",
        ] {
            assert!(c(yes), "{yes}");
        }
        for no in [
            "text/event-stream",
            "image/png",
            "application/octet-stream",
            "application/gzip",
            "application/zip",
            "video/mp4",
            "json",
        ] {
            assert!(!c(no), "{no}");
        }
        assert!(!compressible(None));
    }

    #[test]
    fn vary_and_etag() {
        let mut h = HeaderMap::new();
        add_vary(&mut h);
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        let mut h = HeaderMap::new();
        h.insert(header::VARY, HeaderValue::from_static("origin"));
        add_vary(&mut h);
        let vary: Vec<_> = h.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["origin", "accept-encoding"]);
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
    }

    #[test]
    fn encoding_round_trips() {
        let text = "the board wants daily numbers; ".repeat(100);
        let gz = encode(text.as_bytes());
        assert!(gz.len() < text.len() / 5);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out)
            .unwrap();
        assert_eq!(out, text);
    }
}
