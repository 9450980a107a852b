//! Image bytes -> `pixel_values`, as transformers' `BlipImageProcessor` produces them: decode
//! (PNG, JPEG, WebP, GIF first frame, BMP) within byte and pixel limits, convert to RGB (alpha
//! dropped, not composited; no EXIF rotation), Pillow-exact resize to `size`, rescale in f64 then
//! cast to f32, normalise in f32, channels first.

mod jpeg;
pub mod resize;

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageFormat, ImageReader};
use serde::Deserialize;

pub use resize::{Filter, Image8};

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("empty image")]
    Empty,
    #[error("image is {size} bytes, over the limit of {limit} bytes")]
    TooManyBytes { size: usize, limit: usize },
    #[error("unsupported image format (expected PNG, JPEG, WebP, GIF or BMP)")]
    UnknownFormat,
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("could not decode image: {0}")]
    Decode(String),
    #[error("invalid preprocessor_config.json: {0}")]
    Config(String),
}

/// Guards against decompression bombs: both are checked before any pixel is decoded.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            max_pixels: 40_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    HeightWidth { height: usize, width: usize },
    Square(usize),
}

#[derive(Debug, Clone, Deserialize)]
struct RawProcessorConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    #[serde(default)]
    size: Option<SizeSpec>,
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "one_over_255")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default)]
    image_mean: Option<Vec<f32>>,
    #[serde(default)]
    image_std: Option<Vec<f32>>,
    #[serde(default = "yes")]
    do_convert_rgb: bool,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn one_over_255() -> f64 {
    1.0 / 255.0
}

/// OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, `BlipImageProcessor`'s defaults, with the digits
/// transformers writes (they round to the same f32).
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// An image size in pixels, as `pixel_values` have it: the processor's `size` (from
/// `preprocessor_config.json`) or one a caller asks for (the vision encoder then interpolates
/// its position embeddings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

impl ImageSize {
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width }
    }

    /// "N" (square) or "HxW".
    pub fn parse(text: &str) -> Result<Self, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    format!("image size {text:?}: expected N or HxW (positive integers)")
                })
        };
        match text.split_once(['x', 'X']) {
            Some((h, w)) => Ok(Self::new(number(h)?, number(w)?)),
            None => number(text).map(|n| Self::new(n, n)),
        }
    }
}

impl std::fmt::Display for ImageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

/// JSON: an integer (square) or `[height, width]`.
impl<'de> Deserialize<'de> for ImageSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Spelled {
            Square(usize),
            HeightWidth([usize; 2]),
        }
        let size = match Spelled::deserialize(d).map_err(|_| {
            serde::de::Error::custom("image_size: expected an integer or [height, width]")
        })? {
            Spelled::Square(n) => Self::new(n, n),
            Spelled::HeightWidth([h, w]) => Self::new(h, w),
        };
        if size.height == 0 || size.width == 0 {
            return Err(serde::de::Error::custom(
                "image_size: sides must be positive",
            ));
        }
        Ok(size)
    }
}

/// The settings of `preprocessor_config.json` that shape `pixel_values`.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub do_resize: bool,
    pub height: usize,
    pub width: usize,
    pub filter: Filter,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub limits: ImageLimits,
}

impl ImageProcessor {
    pub fn from_json_str(json: &str, limits: ImageLimits) -> Result<Self, PreprocessError> {
        let raw: RawProcessorConfig =
            serde_json::from_str(json).map_err(|e| PreprocessError::Config(e.to_string()))?;
        // BlipImageProcessor's default size is 384x384.
        let (height, width) = match raw.size {
            Some(SizeSpec::HeightWidth { height, width }) => (height, width),
            Some(SizeSpec::Square(s)) => (s, s),
            None => (384, 384),
        };
        if height == 0 || width == 0 {
            return Err(PreprocessError::Config("size must be positive".into()));
        }
        let filter = Filter::from_pil(raw.resample).ok_or_else(|| {
            PreprocessError::Config(format!(
                "resample {} is not supported (2 = bilinear, 3 = bicubic)",
                raw.resample
            ))
        })?;
        let triple = |v: Option<Vec<f32>>, default: [f32; 3], name: &str| match v {
            None => Ok(default),
            Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
            Some(v) => Err(PreprocessError::Config(format!(
                "{name} has {} values, expected 3",
                v.len()
            ))),
        };
        if !raw.do_convert_rgb {
            tracing::warn!("preprocessor_config.json sets do_convert_rgb=false; images are converted to RGB anyway");
        }
        Ok(Self {
            do_resize: raw.do_resize,
            height,
            width,
            filter,
            do_rescale: raw.do_rescale,
            rescale_factor: raw.rescale_factor,
            do_normalize: raw.do_normalize,
            mean: triple(raw.image_mean, CLIP_MEAN, "image_mean")?,
            std: triple(raw.image_std, CLIP_STD, "image_std")?,
            limits,
        })
    }

    pub fn from_file(path: &Path, limits: ImageLimits) -> Result<Self, PreprocessError> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| PreprocessError::Config(format!("{}: {e}", path.display())))?;
        Self::from_json_str(&json, limits)
    }

    /// The size `pixel_values` have.
    pub fn size(&self) -> ImageSize {
        ImageSize::new(self.height, self.width)
    }

    /// The same processor resizing to `size` instead (the processor's `size=` argument).
    pub fn at_size(&self, size: ImageSize) -> Self {
        Self {
            height: size.height,
            width: size.width,
            ..self.clone()
        }
    }

    /// Decoded RGB image resized as the reference does (the u8 image before rescaling).
    pub fn resized_rgb(&self, bytes: &[u8]) -> Result<Image8, PreprocessError> {
        let rgb = decode_rgb(bytes, self.limits)?;
        if !self.do_resize {
            return Ok(rgb);
        }
        Ok(resize::resize(&rgb, self.width, self.height, self.filter))
    }

    /// `pixel_values` for one image: [3, H, W] f32, normalised.
    pub fn pixel_values(&self, bytes: &[u8]) -> Result<Vec<f32>, PreprocessError> {
        Ok(self.normalize(&self.resized_rgb(bytes)?))
    }

    /// Rescale (in f64, cast to f32 as numpy does) and normalise (in f32), HWC -> CHW.
    pub fn normalize(&self, img: &Image8) -> Vec<f32> {
        let plane = img.width * img.height;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale {
                    (px[c] as f64 * self.rescale_factor) as f32
                } else {
                    px[c] as f32
                };
                if self.do_normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                out[c * plane + i] = v;
            }
        }
        out
    }

    /// Stacks the images' pixel values into a [B, 3, H, W] tensor.
    pub fn batch_tensor(
        &self,
        images: &[Vec<f32>],
        device: &Device,
    ) -> Result<Tensor, candle_core::Error> {
        let data: Vec<f32> = images.iter().flatten().copied().collect();
        Tensor::from_vec(data, (images.len(), 3, self.height, self.width), device)
    }
}

/// Decodes within `limits` and converts to 8-bit RGB as PIL's `convert("RGB")` does for the
/// common modes (alpha dropped; grey replicated; palette expanded).
pub fn decode_rgb(bytes: &[u8], limits: ImageLimits) -> Result<Image8, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(PreprocessError::TooManyBytes {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| PreprocessError::UnknownFormat)?;
    if format == ImageFormat::Jpeg {
        return jpeg::decode_rgb(bytes, limits);
    }
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif | ImageFormat::Bmp
    ) {
        return Err(PreprocessError::UnknownFormat);
    }
    // PNG's size is in IHDR, the first chunk; the decoder wants to see more of the file before it
    // reports it, and a bomb must be refused as a bomb even when the rest is missing.
    let (width, height) = match png_ihdr_size(bytes) {
        Some(size) => size,
        None => ImageReader::with_format(Cursor::new(bytes), format)
            .into_dimensions()
            .map_err(|e| PreprocessError::Decode(e.to_string()))?,
    };
    let pixels = check_pixels(width, height, limits)?;
    if format == ImageFormat::Png {
        png_check_palette(bytes)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(width);
    decoder_limits.max_image_height = Some(height);
    // Room for the decoded frame at 16 bits per channel with alpha, plus decoder scratch.
    decoder_limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    // A decoder's panic on a malformed file (a bug of its own, like the one png_check_palette
    // works around) refuses that image; it must not become a 500 or end the worker.
    let img = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()))
        .map_err(|_| {
            PreprocessError::Decode(format!(
                "the {format:?} decoder failed on this file (it is malformed)"
            ))
        })?
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    Ok(to_rgb8(img))
}

/// Refuses a PNG whose palette (PLTE) is not a whole number of RGB entries (1 to 256 of them),
/// which the PNG specification forbids: png 0.18.1 accepts one and then panics expanding it
/// (found by the `image` fuzz target; image-rs/image-png#694). Chunks are walked up to the
/// first IDAT; a file cut short before it is left to the decoder's own errors.
fn png_check_palette(bytes: &[u8]) -> Result<(), PreprocessError> {
    let mut at = 8usize;
    while let Some(head) = bytes.get(at..at + 8) {
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        match &head[4..8] {
            b"PLTE" if length == 0 || !length.is_multiple_of(3) || length > 768 => {
                return Err(PreprocessError::Decode(format!(
                    "PNG palette (PLTE) of {length} bytes: not 1 to 256 RGB entries of 3 bytes"
                )));
            }
            b"IDAT" | b"IEND" => break,
            _ => {}
        }
        // Length, type, data and CRC.
        at = match at.checked_add(12).and_then(|n| n.checked_add(length)) {
            Some(next) => next,
            None => break,
        };
    }
    Ok(())
}

/// Refuses images over the pixel limit (and empty ones); returns the pixel count.
fn check_pixels(width: u32, height: u32, limits: ImageLimits) -> Result<u64, PreprocessError> {
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(PreprocessError::Decode(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    Ok(pixels)
}

fn png_ihdr_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
    let height = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
    Some((width, height))
}

/// RGB as PIL's `convert("RGB")` gives it. 16-bit PNGs differ from the `image` crate's
/// rounding: PIL keeps the high byte of 16-bit colour (and grey+alpha), and clips 16-bit grey
/// (its mode I;16) to 255.
fn to_rgb8(img: DynamicImage) -> Image8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let from_fn = |data: Vec<u8>| Image8 {
        width,
        height,
        channels: 3,
        data,
    };
    match &img {
        DynamicImage::ImageLuma16(g) => {
            return from_fn(
                g.as_raw()
                    .iter()
                    .flat_map(|&v| [v.min(255) as u8; 3])
                    .collect(),
            );
        }
        DynamicImage::ImageLumaA16(g) => {
            return from_fn(
                g.as_raw()
                    .chunks_exact(2)
                    .flat_map(|p| [(p[0] >> 8) as u8; 3])
                    .collect(),
            );
        }
        DynamicImage::ImageRgb16(c) => {
            return from_fn(c.as_raw().iter().map(|&v| (v >> 8) as u8).collect());
        }
        DynamicImage::ImageRgba16(c) => {
            return from_fn(
                c.as_raw()
                    .chunks_exact(4)
                    .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
                    .collect(),
            );
        }
        _ => {}
    }
    let rgb = img.into_rgb8();
    Image8 {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        channels: 3,
        data: rgb.into_raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
        // A PNG signature and an IHDR chunk with a valid CRC, and no image data after it.
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let crc = crc32(&ihdr);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc.to_be_bytes());
        png
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn a_header_claiming_20000_squared_is_refused_before_decoding() {
        let err =
            decode_rgb(&png_header_claiming(20000, 20000), ImageLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::TooManyPixels {
                    width: 20000,
                    height: 20000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn empty_and_garbage_bytes_are_clear_errors() {
        assert!(matches!(
            decode_rgb(b"", ImageLimits::default()),
            Err(PreprocessError::Empty)
        ));
        assert!(matches!(
            decode_rgb(b"hello, not an image", ImageLimits::default()),
            Err(PreprocessError::UnknownFormat)
        ));
        let limits = ImageLimits {
            max_bytes: 4,
            max_pixels: 10,
        };
        assert!(matches!(
            decode_rgb(b"12345", limits),
            Err(PreprocessError::TooManyBytes { .. })
        ));
    }

    #[test]
    fn image_sizes_parse_from_text_and_json() {
        assert_eq!(ImageSize::parse("224"), Ok(ImageSize::new(224, 224)));
        assert_eq!(ImageSize::parse("224x448"), Ok(ImageSize::new(224, 448)));
        for bad in ["", "0", "x", "12x", "-3", "1.5", "3x0"] {
            assert!(ImageSize::parse(bad).is_err(), "{bad:?}");
        }
        let from = |v: serde_json::Value| serde_json::from_value::<ImageSize>(v);
        assert_eq!(from(serde_json::json!(28)).unwrap(), ImageSize::new(28, 28));
        assert_eq!(
            from(serde_json::json!([21, 35])).unwrap(),
            ImageSize::new(21, 35)
        );
        for bad in [
            serde_json::json!(0),
            serde_json::json!([1]),
            serde_json::json!([1, 2, 3]),
            serde_json::json!("28"),
            serde_json::json!(-1),
        ] {
            assert!(from(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn truncated_png_is_a_decode_error() {
        let err = decode_rgb(&png_header_claiming(16, 16), ImageLimits::default()).unwrap_err();
        assert!(matches!(err, PreprocessError::Decode(_)), "{err}");
    }
}
