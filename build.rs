//! Compiles the small libjpeg shim (src/preprocess/c/jpeg_decode.c) and links the system
//! libjpeg(-turbo): Pillow decodes JPEG with libjpeg-turbo, and only the same decoder gives the
//! same pixels (pure-Rust decoders differ by up to 4 levels). Debian: libjpeg62-turbo-dev.
fn main() {
    println!("cargo:rerun-if-changed=src/preprocess/c/jpeg_decode.c");
    cc::Build::new()
        .file("src/preprocess/c/jpeg_decode.c")
        .warnings(true)
        .compile("blip2_jpeg");
    println!("cargo:rustc-link-lib=jpeg");
}
