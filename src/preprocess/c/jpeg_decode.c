/* Decodes a JPEG with libjpeg(-turbo) exactly as Pillow does by default (accurate integer IDCT,
 * fancy upsampling, libjpeg's own YCbCr -> RGB), so that our pixels equal the reference's.
 * Errors longjmp back here and are reported as text; nothing is printed. */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct blip2_err {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void blip2_error_exit(j_common_ptr cinfo) {
    struct blip2_err *err = (struct blip2_err *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* Warnings are ignored as Pillow ignores them, except a premature end of data: Pillow refuses
 * a truncated JPEG ("image file is truncated"), so do we. */
static void blip2_emit_message(j_common_ptr cinfo, int level) {
    if (level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        blip2_error_exit(cinfo);
    }
}

/* Reads the header only: width, height and components. Returns 0 on success. */
int blip2_jpeg_info(const uint8_t *data, size_t len, uint32_t *width, uint32_t *height,
                    int *components, char *message, size_t message_len) {
    struct jpeg_decompress_struct cinfo;
    struct blip2_err err;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = blip2_error_exit;
    err.mgr.emit_message = blip2_emit_message;
    if (setjmp(err.jump)) {
        snprintf(message, message_len, "%s", err.message);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    *width = cinfo.image_width;
    *height = cinfo.image_height;
    *components = cinfo.num_components;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* Pillow's CMYK -> RGB for one pixel of libjpeg's CMYK output. Pillow reads 4-component JPEGs
 * with Adobe's inverted polarity (rawmode "CMYK;I": C = 255 - stored, and so on), then converts
 * as its cmyk2rgb: channel = clip(nk - nk * C / 255), nk = 255 - K, the product rounded as its
 * MULDIV255. With K = 255 - stored k, nk is the stored k. */
static void blip2_cmyk_to_rgb(const uint8_t *in, uint8_t *out) {
    int nk = in[3];
    for (int c = 0; c < 3; c++) {
        int tmp = (255 - in[c]) * nk + 128;
        int v = nk - (((tmp >> 8) + tmp) >> 8);
        out[c] = (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
    }
}

/* Decodes to RGB (3 bytes per pixel) into `out`, which holds width * height * 3 bytes as given
 * by blip2_jpeg_info. Grayscale is replicated, as PIL's L -> RGB; CMYK (and YCCK, which libjpeg
 * turns into CMYK) is converted as Pillow converts it. Returns 0 on success. */
int blip2_jpeg_decode_rgb(const uint8_t *data, size_t len, uint8_t *out, size_t out_len,
                          char *message, size_t message_len) {
    struct jpeg_decompress_struct cinfo;
    struct blip2_err err;
    JSAMPROW row = NULL;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = blip2_error_exit;
    err.mgr.emit_message = blip2_emit_message;
    if (setjmp(err.jump)) {
        snprintf(message, message_len, "%s", err.message);
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.num_components != 1 && cinfo.num_components != 3 && cinfo.num_components != 4) {
        snprintf(message, message_len, "JPEG with %d components is not supported",
                 cinfo.num_components);
        jpeg_destroy_decompress(&cinfo);
        return 2;
    }
    cinfo.out_color_space = cinfo.num_components == 1   ? JCS_GRAYSCALE
                            : cinfo.num_components == 4 ? JCS_CMYK
                                                        : JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);
    size_t w = cinfo.output_width, h = cinfo.output_height;
    int comps = cinfo.output_components;
    if (w * h * 3 != out_len) {
        snprintf(message, message_len, "JPEG output size changed while decoding");
        jpeg_destroy_decompress(&cinfo);
        return 3;
    }
    row = (JSAMPROW)malloc(w * (size_t)comps);
    if (row == NULL) {
        snprintf(message, message_len, "out of memory");
        jpeg_destroy_decompress(&cinfo);
        return 4;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        size_t y = cinfo.output_scanline;
        jpeg_read_scanlines(&cinfo, &row, 1);
        uint8_t *dst = out + y * w * 3;
        if (comps == 3) {
            memcpy(dst, row, w * 3);
        } else if (comps == 4) {
            for (size_t x = 0; x < w; x++) {
                blip2_cmyk_to_rgb(row + 4 * x, dst + 3 * x);
            }
        } else {
            for (size_t x = 0; x < w; x++) {
                dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = row[x];
            }
        }
    }
    jpeg_finish_decompress(&cinfo);
    free(row);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
