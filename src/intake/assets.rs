//! The static documents the API serves: the dashboard page (`/ui`) and the OpenAPI document
//! (`/openapi.json`), embedded gzip-compressed by the build script (`build.rs`).

use crate::http::{Reply, Request, Response};

/// `ui/index.html`, gzip.
const UI: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui.html.gz"));
/// `docs/openapi.yaml` as compact JSON, gzip.
const OPENAPI: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/openapi.json.gz"));

/// An embedded document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Asset {
    Ui,
    OpenApi,
}

/// The document for `path`, if it names one.
pub(crate) fn by_path(path: &str) -> Option<Asset> {
    match path {
        "/ui" | "/ui/" => Some(Asset::Ui),
        "/openapi.json" => Some(Asset::OpenApi),
        _ => None,
    }
}

/// The answer to a `GET` of `asset`: the compressed bytes as they are, or 406 for a client
/// that does not take gzip (the binary holds no decompressor).
pub(crate) fn serve(asset: Asset, req: &Request) -> Reply {
    let (bytes, kind) = match asset {
        Asset::Ui => (UI, "text/html; charset=utf-8"),
        Asset::OpenApi => (OPENAPI, "application/json"),
    };
    if !takes_gzip(req.header("accept-encoding").unwrap_or("")) {
        return Response::fail(
            406,
            "this document is sent gzip-compressed: ask with Accept-Encoding: gzip (curl --compressed)",
        )
        .into();
    }
    Response {
        code: 200,
        kind,
        headers: vec![
            ("Content-Encoding", "gzip".to_string()),
            ("Vary", "Accept-Encoding".to_string()),
            ("Cache-Control", "no-cache".to_string()),
        ],
        body: bytes.to_vec(),
        close: false,
    }
    .into()
}

/// Whether an `Accept-Encoding` value accepts gzip: `gzip` or `*` listed without `q=0`.
fn takes_gzip(accept: &str) -> bool {
    accept.split(',').any(|item| {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn the_embedded_documents_are_the_sources() {
        let page = gunzip(UI);
        assert_eq!(page, std::fs::read("ui/index.html").expect("ui/index.html"));
        let doc: serde_json::Value =
            serde_json::from_slice(&gunzip(OPENAPI)).expect("the OpenAPI document is JSON");
        assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    }

    #[test]
    fn gzip_is_taken_unless_refused() {
        for yes in [
            "gzip",
            "gzip, deflate, br",
            "br;q=1.0, GZIP;q=0.5",
            "*",
            "deflate, *;q=0.1",
        ] {
            assert!(takes_gzip(yes), "{yes}");
        }
        for no in [
            "",
            "identity",
            "deflate, br",
            "gzip;q=0",
            "gzip; q=0.0",
            "x-gzip2",
        ] {
            assert!(!takes_gzip(no), "{no}");
        }
    }
}
