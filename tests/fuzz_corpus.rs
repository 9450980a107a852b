//! The fuzz targets' checks (fuzz/src/lib.rs) on stable Rust, over the committed seed corpora
//! (fuzz/corpus/<target>/) and every input a fuzzing run found to break a promise
//! (fuzz/regressions/<target>/, kept once fixed): a fixed crash stays fixed, and the seeds stay
//! inputs the targets accept. The fuzzing itself is `cargo fuzz` (README "Fuzzing").

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.expect("a corpus entry").path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).expect("reading a corpus file");
            eprintln!("{target}: {}", path.display());
            check(&data);
            count += 1;
        }
    }
    assert!(count > 0, "no seeds for {target} in fuzz/corpus/{target}");
}

#[test]
fn image() {
    replay("image", checks::image);
}

#[test]
fn json_body() {
    replay("json_body", checks::json_body);
}

#[test]
fn multipart_body() {
    replay("multipart_body", checks::multipart_body);
}

/// The body seeds are requests the server answers 200 (else the fuzzer would start from
/// refusals and rarely reach decoding): each one, checked as the target checks it.
#[test]
fn body_seeds_are_answered() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in [
        ("json_body", checks::json_body_status as fn(&[u8]) -> _),
        ("multipart_body", checks::multipart_body_status),
    ] {
        for entry in std::fs::read_dir(fuzz.join(target)).expect("the seeds") {
            let path = entry.expect("a seed").path();
            let (status, body) =
                check(&std::fs::read(&path).expect("reading a seed")).expect("a seed is not empty");
            assert_eq!(status.as_u16(), 200, "{}: {body}", path.display());
        }
    }
}

#[test]
fn detok() {
    replay("detok", checks::detok);
}

#[test]
fn safetensors() {
    replay("safetensors", checks::safetensors);
    let _ = std::fs::remove_dir_all(checks::scratch("safetensors"));
}

#[test]
fn shard_index() {
    replay("shard_index", checks::shard_index);
    let _ = std::fs::remove_dir_all(checks::scratch("shard_index"));
}
