//! Pillow's `Image.resize` for 8-bit images (libImaging/Resample.c), ported so that the bytes
//! match: separable passes with antialiased filters whose support grows with the downscale
//! factor, coefficients normalised then rounded to 22-bit fixed point, and each pass rounded and
//! clipped to u8. Pillow 13 runs the vertical pass first when the image loses more rows than
//! twice the columns it loses; earlier versions always ran the horizontal pass first.
//! Neither the `image` crate nor `fast_image_resize` reproduces these bytes.

/// The resampling filters transformers' image processors ask PIL for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// PIL `BILINEAR` (2): triangle, support 1.
    Bilinear,
    /// PIL `BICUBIC` (3): cubic convolution with a = -0.5, support 2.
    Bicubic,
}

impl Filter {
    /// From PIL's enum value as stored in `preprocessor_config.json` (`resample`).
    pub fn from_pil(value: u32) -> Option<Self> {
        match value {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first source index and its fixed-point weights.
struct Coefficients {
    starts: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the full source range `0..in_size`.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    let mut starts = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero; both bounds are clamped into the source.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..count)
            .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            for w in &mut k {
                *w /= total;
            }
        }
        let fixed = k
            .iter()
            .map(|&w| {
                let scaled = w * (1u32 << PRECISION_BITS) as f64;
                if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                }
            })
            .collect();
        starts.push(xmin);
        weights.push(fixed);
    }
    Coefficients { starts, weights }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An 8-bit interleaved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

fn resample_horizontal(src: &Image8, out_w: usize, filter: Filter) -> Image8 {
    let c = src.channels;
    let coeffs = coefficients(src.width, out_w, filter);
    let mut data = vec![0u8; out_w * src.height * c];
    for y in 0..src.height {
        let row = &src.data[y * src.width * c..(y + 1) * src.width * c];
        let out = &mut data[y * out_w * c..(y + 1) * out_w * c];
        for (xx, (start, k)) in coeffs.starts.iter().zip(&coeffs.weights).enumerate() {
            for ch in 0..c {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    acc += row[(start + i) * c + ch] as i64 * w as i64;
                }
                out[xx * c + ch] = clip8(acc);
            }
        }
    }
    Image8 {
        width: out_w,
        height: src.height,
        channels: c,
        data,
    }
}

fn resample_vertical(src: &Image8, out_h: usize, filter: Filter) -> Image8 {
    let c = src.channels;
    let stride = src.width * c;
    let coeffs = coefficients(src.height, out_h, filter);
    let mut data = vec![0u8; out_h * stride];
    for (yy, (start, k)) in coeffs.starts.iter().zip(&coeffs.weights).enumerate() {
        let out = &mut data[yy * stride..(yy + 1) * stride];
        for (x, o) in out.iter_mut().enumerate() {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &w) in k.iter().enumerate() {
                acc += src.data[(start + i) * stride + x] as i64 * w as i64;
            }
            *o = clip8(acc);
        }
    }
    Image8 {
        width: src.width,
        height: out_h,
        channels: c,
        data,
    }
}

/// `Image.resize((out_w, out_h), filter)` as Pillow 13 computes it.
pub fn resize(src: &Image8, out_w: usize, out_h: usize, filter: Filter) -> Image8 {
    let need_h = out_w != src.width;
    let need_v = out_h != src.height;
    let (in_w, in_h) = (src.width as i64, src.height as i64);
    let (dw, dh) = (in_w - out_w as i64, in_h - out_h as i64);
    let vertical_first = dh > 0 && dh > 2 * dw;
    match (need_h, need_v) {
        (false, false) => src.clone(),
        (true, false) => resample_horizontal(src, out_w, filter),
        (false, true) => resample_vertical(src, out_h, filter),
        (true, true) if vertical_first => {
            resample_horizontal(&resample_vertical(src, out_h, filter), out_w, filter)
        }
        (true, true) => resample_vertical(&resample_horizontal(src, out_w, filter), out_h, filter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_each_output_pixel_sum_to_one_in_fixed_point() {
        for (inp, out) in [(640, 224), (5, 224), (224, 224), (1000, 7)] {
            let c = coefficients(inp, out, Filter::Bicubic);
            for k in &c.weights {
                let sum: i64 = k.iter().map(|&w| w as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{inp}->{out}"
                );
            }
        }
    }

    #[test]
    fn flat_image_stays_flat() {
        let src = Image8 {
            width: 37,
            height: 11,
            channels: 3,
            data: vec![200; 37 * 11 * 3],
        };
        let out = resize(&src, 224, 224, Filter::Bicubic);
        assert!(out.data.iter().all(|&v| v == 200));
    }
}
