//! JPEG through libjpeg-turbo, the decoder Pillow uses, with Pillow's settings (accurate integer
//! IDCT, fancy upsampling). See build.rs and c/jpeg_decode.c.

use std::ffi::{c_char, c_int, CStr};

use super::{Image8, ImageLimits, PreprocessError};

extern "C" {
    fn blip2_jpeg_info(
        data: *const u8,
        len: usize,
        width: *mut u32,
        height: *mut u32,
        components: *mut c_int,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
    fn blip2_jpeg_decode_rgb(
        data: *const u8,
        len: usize,
        out: *mut u8,
        out_len: usize,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
}

fn message(buf: &[c_char]) -> String {
    // SAFETY: the shim always writes a NUL-terminated string (snprintf) before failing.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Width and height from the header, without decoding.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), PreprocessError> {
    let (mut w, mut h, mut c) = (0u32, 0u32, 0 as c_int);
    let mut msg = [0 as c_char; 256];
    // SAFETY: pointers are valid for the given lengths for the duration of the call.
    let rc = unsafe {
        blip2_jpeg_info(
            bytes.as_ptr(),
            bytes.len(),
            &mut w,
            &mut h,
            &mut c,
            msg.as_mut_ptr(),
            msg.len(),
        )
    };
    if rc != 0 {
        return Err(PreprocessError::Decode(format!("JPEG: {}", message(&msg))));
    }
    Ok((w, h))
}

/// Decodes to 8-bit RGB after checking the size against `limits`.
pub fn decode_rgb(bytes: &[u8], limits: ImageLimits) -> Result<Image8, PreprocessError> {
    let (width, height) = dimensions(bytes)?;
    super::check_pixels(width, height, limits)?;
    let mut data = vec![0u8; width as usize * height as usize * 3];
    let mut msg = [0 as c_char; 256];
    // SAFETY: `data` holds exactly width * height * 3 bytes, as the shim checks.
    let rc = unsafe {
        blip2_jpeg_decode_rgb(
            bytes.as_ptr(),
            bytes.len(),
            data.as_mut_ptr(),
            data.len(),
            msg.as_mut_ptr(),
            msg.len(),
        )
    };
    if rc != 0 {
        return Err(PreprocessError::Decode(format!("JPEG: {}", message(&msg))));
    }
    Ok(Image8 {
        width: width as usize,
        height: height as usize,
        channels: 3,
        data,
    })
}
