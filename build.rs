//! Build script: compresses the files the server embeds (the dashboard page and the OpenAPI
//! document, converted from YAML to compact JSON) into gzip bytes in `OUT_DIR`, which
//! `src/http/assets.rs` includes. Gzip costs the binary's size budget about a quarter of the
//! text, and every browser and HTTP client can take it.

use flate2::{write::GzEncoder, Compression, GzBuilder};
use std::io::Write;
use std::path::Path;
use std::{env, fs};

fn main() {
    let out = env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let ui = read("ui/index.html");
    write_gz(&Path::new(&out).join("ui.html.gz"), &ui);
    let yaml = read("docs/openapi.yaml");
    let doc: serde_json::Value = serde_norway::from_slice(&yaml)
        .unwrap_or_else(|e| panic!("docs/openapi.yaml is not valid YAML: {e}"));
    let json = serde_json::to_vec(&doc).expect("a YAML document converts to JSON");
    write_gz(&Path::new(&out).join("openapi.json.gz"), &json);
}

fn read(path: &str) -> Vec<u8> {
    println!("cargo:rerun-if-changed={path}");
    fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Gzip at the best level, with no file name or time in the header: the same input always
/// gives the same bytes.
fn write_gz(path: &Path, data: &[u8]) {
    let mut gz: GzEncoder<Vec<u8>> = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gz.write_all(data).expect("writing to memory");
    let bytes = gz.finish().expect("writing to memory");
    fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
