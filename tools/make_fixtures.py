#!/usr/bin/env python3
"""Generate the golden test fixtures for the Rust BLIP-2 reimplementation.

Usage:
    python tools/make_fixtures.py [--out tests/fixtures]

Everything written here is produced by running the pinned reference
(transformers 4.57.6 `Blip2ForConditionalGeneration` / `Blip2Processor`,
torch 2.9.1, Pillow 13.0.0). Nothing expected is typed by hand. The script is
deterministic (fixed seeds, single-threaded torch) and needs no network.

Output layout (see tests/fixtures/README.md for details):
    images/                      synthetic source images (PNG/BMP/JPEG/GIF/WebP)
    preprocess/                  resized u8 images (<stem>.224.png, <stem>.28.png)
                                 + pixel_values.safetensors
    models/<name>/               tiny checkpoints in the Hub layout
    models/<name>/golden/        golden.json + golden.safetensors
"""

import argparse
import contextlib
import copy
import json
import os
import shutil

from pins import check_versions  # tools/pins.py

VERSIONS = check_versions()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from safetensors.torch import load_file as pt_load_file  # noqa: E402
from safetensors.torch import save_file as pt_save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    GPT2TokenizerFast,
    T5TokenizerFast,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_MARGIN = 1e-3  # required greedy top-1/top-2 gap at every golden step
MAX_F32_DRIFT = 5e-6  # max |torch f32 - torch f64| allowed at every stored stage (tests compare at 1e-4)

# --------------------------------------------------------------------------
# A. Source images
# --------------------------------------------------------------------------


def _pattern_rgb(w, h, rng):
    """Smooth gradients + sharp edges + a patch of pure noise, as float64 HxWx3."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / max(w - 1, 1)
    g = 255.0 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(2 * np.pi * 3 * (x + 2 * y) / max(w, h))
    img = np.stack([r, g, b], axis=-1)

    def box(x0, x1, y0, y1):
        return slice(int(y0 * h), max(int(y1 * h), int(y0 * h) + 1)), slice(
            int(x0 * w), max(int(x1 * w), int(x0 * w) + 1)
        )

    # solid rectangle with a random colour (hard edges)
    img[box(0.10, 0.35, 0.55, 0.85)] = rng.integers(0, 256, 3)
    # filled circle
    cx, cy, rad = 0.7 * w, 0.35 * h, 0.2 * min(w, h)
    img[(x - cx) ** 2 + (y - cy) ** 2 <= rad * rad] = rng.integers(0, 256, 3)
    # 1-pixel vertical black/white stripes (maximal aliasing)
    sy, sx = box(0.45, 0.60, 0.60, 0.95)
    stripes = np.where((x[sy, sx].astype(np.int64) % 2) == 0, 255.0, 0.0)
    img[sy, sx] = stripes[..., None]
    # 2-pixel checkerboard
    cy_, cx_ = box(0.75, 0.95, 0.70, 0.95)
    chk = ((x[cy_, cx_].astype(np.int64) // 2 + y[cy_, cx_].astype(np.int64) // 2) % 2) * 255.0
    img[cy_, cx_] = np.stack([chk, 255.0 - chk, chk * 0.5], axis=-1)
    # patch of uniform noise
    ny, nx = box(0.05, 0.30, 0.05, 0.30)
    shape = img[ny, nx].shape
    img[ny, nx] = rng.integers(0, 256, shape)
    return img


def _u8(a):
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def make_images(img_dir):
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(20240607)
    files = {}

    def put(name, im, **kw):
        p = os.path.join(img_dir, name)
        im.save(p, **kw)
        files[name] = p

    put("rgb_640x480.png", Image.fromarray(_u8(_pattern_rgb(640, 480, rng)), "RGB"), optimize=True)
    put("tall_300x1000.png", Image.fromarray(_u8(_pattern_rgb(300, 1000, rng)), "RGB"), optimize=True)
    put("wide_1000x150.png", Image.fromarray(_u8(_pattern_rgb(1000, 150, rng)), "RGB"), optimize=True)

    # RGBA: varying alpha, including fully transparent pixels whose RGB is not black/white
    rgb = _u8(_pattern_rgb(100, 37, rng))
    yy, xx = np.mgrid[0:37, 0:100]
    alpha = (255.0 * xx / 99.0).astype(np.float64)
    alpha[:, :10] = 0.0
    alpha[20:30, 40:70] = rng.integers(0, 256, (10, 30))
    rgba = np.concatenate([rgb, _u8(alpha)[..., None]], axis=-1)
    put("rgba_100x37.png", Image.fromarray(rgba, "RGBA"))

    # Grayscale (mode L), narrow and tall
    gray = _pattern_rgb(13, 200, rng).mean(axis=-1)
    put("gray_13x200.png", Image.fromarray(_u8(gray), "L"))

    # Palette (mode P), 16 colours
    yy, xx = np.mgrid[0:64, 0:64]
    idx = (xx // 8 + 3 * (yy // 8)) % 16
    idx[40:56, 4:28] = rng.integers(0, 16, (16, 24))
    pal_img = Image.fromarray(idx.astype(np.uint8), "P")
    pal_img.putpalette(rng.integers(0, 256, 16 * 3).astype(np.uint8).tolist())
    put("palette_64x64.png", pal_img)

    # Tiny RGB BMP (big upscale)
    put("tiny_5x7.bmp", Image.fromarray(rng.integers(0, 256, (7, 5, 3)).astype(np.uint8), "RGB"))

    # JPEG, quality 90, 4:2:0 chroma subsampling
    put(
        "photo_320x240.jpg",
        Image.fromarray(_u8(_pattern_rgb(320, 240, rng)), "RGB"),
        quality=90,
        subsampling=2,
    )

    # Animated GIF, 2 frames with different palettes/colours; the first frame counts
    yy, xx = np.mgrid[0:30, 0:40]
    f_idx = ((xx // 5 + yy // 5) % 4).astype(np.uint8)
    f1 = Image.fromarray(f_idx, "P")
    f1.putpalette([255, 0, 0, 200, 40, 0, 255, 128, 64, 90, 10, 10] + [0] * (252 * 3))
    f2 = Image.fromarray((3 - f_idx).astype(np.uint8), "P")
    f2.putpalette([0, 0, 255, 0, 160, 220, 20, 20, 90, 120, 200, 255] + [0] * (252 * 3))
    p = os.path.join(img_dir, "anim_40x30.gif")
    f1.save(p, save_all=True, append_images=[f2], duration=100, loop=0)
    files["anim_40x30.gif"] = p

    # Lossless WebP
    put(
        "lossless_50x60.webp",
        Image.fromarray(_u8(_pattern_rgb(50, 60, rng)), "RGB"),
        lossless=True,
    )

    # CMYK JPEG (Pillow writes Adobe polarity and reads it back as "CMYK;I"; RGB via cmyk2rgb)
    cmyk = np.concatenate([_u8(_pattern_rgb(48, 40, rng)), _u8(_pattern_rgb(48, 40, rng)[..., :1])], axis=-1)
    put("cmyk_48x40.jpg", Image.fromarray(cmyk, "CMYK"), quality=90)

    # sanity: decoded modes/sizes are what the names promise
    expect = {
        "rgb_640x480.png": ("RGB", (640, 480)),
        "tall_300x1000.png": ("RGB", (300, 1000)),
        "wide_1000x150.png": ("RGB", (1000, 150)),
        "rgba_100x37.png": ("RGBA", (100, 37)),
        "gray_13x200.png": ("L", (13, 200)),
        "palette_64x64.png": ("P", (64, 64)),
        "tiny_5x7.bmp": ("RGB", (5, 7)),
        "photo_320x240.jpg": ("RGB", (320, 240)),
        "anim_40x30.gif": ("P", (40, 30)),
        "lossless_50x60.webp": ("RGB", (50, 60)),
        "cmyk_48x40.jpg": ("CMYK", (48, 40)),
    }
    for name, (mode, size) in expect.items():
        with Image.open(files[name]) as im:
            assert (im.mode, im.size) == (mode, size), (name, im.mode, im.size)
    with Image.open(files["anim_40x30.gif"]) as im:
        assert im.n_frames == 2
        first = np.asarray(im.convert("RGB")).copy()
        im.seek(1)
        second = np.asarray(im.convert("RGB")).copy()
        assert not np.array_equal(first, second)
    return files


# --------------------------------------------------------------------------
# B. Preprocessing goldens
# --------------------------------------------------------------------------


def make_image_processor(size):
    return BlipImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )


def rescale_normalize(u8_hwc):
    x = (u8_hwc.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return x.transpose(2, 0, 1).astype(np.float32)


def make_preprocess(files, pre_dir):
    os.makedirs(pre_dir, exist_ok=True)
    tensors = {}
    for size in (224, 28):
        ip = make_image_processor(size)
        for name, path in files.items():
            stem = os.path.splitext(name)[0]
            with Image.open(path) as im:
                resized = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)).copy()
            with Image.open(path) as im:
                pv = ip(im, return_tensors="np")["pixel_values"][0]
            assert pv.dtype == np.float32 and pv.shape == (3, size, size)
            mine = rescale_normalize(resized)
            assert np.array_equal(mine, pv), f"rescale+normalise mismatch for {name} @ {size}"
            Image.fromarray(resized, "RGB").save(os.path.join(pre_dir, f"{stem}.{size}.png"), optimize=True)
            if size == 28:
                tensors[f"{stem}.28"] = pv
            elif stem == "rgb_640x480":
                tensors["rgb_640x480"] = pv
    np_save_file(tensors, os.path.join(pre_dir, "pixel_values.safetensors"), metadata={"format": "np"})


# --------------------------------------------------------------------------
# Tokenizers (trained offline on a small built-in corpus)
# --------------------------------------------------------------------------

CORPUS = [
    "a photo of a cat sitting on a red sofa.",
    "a photo of a dog running in the green grass.",
    "a close up photo of a small bird on a branch.",
    "two cats are sleeping next to each other on a blue blanket.",
    "a black and white photo of an old house.",
    "a picture of a horse standing in a field at sunset.",
    "a red car parked on the side of the street.",
    "a group of people walking on the beach.",
    "an orange and white cat looking at the camera.",
    "a brown dog with a yellow ball in its mouth.",
    "a bowl of fruit with apples, bananas and oranges.",
    "a white bird flying over the blue water.",
    "the sky is full of grey clouds.",
    "a yellow flower in a green garden.",
    "a man riding a bicycle down a busy road.",
    "a woman holding an umbrella in the rain.",
    "a plate of food on a wooden table.",
    "a purple and pink painting of a mountain.",
    "three sheep eating grass on a hill.",
    "a large elephant walking through the dust.",
    "Question: what is in the picture? Answer: a cat.",
    "Question: what color is the car? Answer: red.",
    "Question: how many dogs are there? Answer: two.",
    "Question: where is the bird? Answer: on a branch.",
    "Question: what is the man doing? Answer: riding a bike.",
    "Question: is it raining? Answer: yes.",
    "Question: what animal is this? Answer: a horse.",
    "Question: what is the weather like? Answer: sunny and warm.",
    "Question: what colour is the flower? Answer: yellow.",
    "Question: what is on the table? Answer: a plate of food.",
    "the colours of the image are red, green, blue, black and white.",
    "a blurry photo of a grey kitten playing with a toy.",
    "a tiger resting in the shade of a tree.",
    "an empty room with a chair and a lamp.",
    "a snowy mountain under a clear blue sky.",
    "a photograph of a city at night with bright lights.",
    "a child feeding ducks at the edge of a pond.",
    "a zebra and a giraffe in the wild.",
    "a cup of coffee next to a laptop.",
    "the photo shows a boat on a calm lake.",
]

PROMPT_PHOTO = "a photo of"
PROMPT_QUESTION = "Question: what is in the picture? Answer:"


def train_opt_tokenizer_json():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert [tok.token_to_id(t) for t in ["<s>", "<pad>", "</s>", "<unk>"]] == [0, 1, 2, 3]
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return tok.to_str()


def train_t5_tokenizer_json(vocab_size=400):
    """Unigram model for the T5 side.

    tokenizers' UnigramTrainer is not deterministic (its EM scores vary by ~1e-4 between runs
    and it stops at ~180 pieces on this corpus), so the Unigram vocabulary is built here
    deterministically from corpus counts: all characters + the most useful multi-character
    sub-word pieces of the Metaspace-prefixed words, each scored log(count / total)."""
    from collections import Counter

    specials = ["<pad>", "</s>", "<unk>"]
    words = [("\u2581" + w) for line in CORPUS for w in line.split()]
    chars = Counter(c for w in words for c in w)
    subs = Counter()
    for w in words:
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + 10) + 1):
                subs[w[i:j]] += 1
    cands = [(p, c) for p, c in subs.items() if c >= 2]
    cands.sort(key=lambda pc: (-pc[1] * (len(pc[0]) - 1), pc[0]))
    n_multi = vocab_size - len(specials) - len(chars)
    chosen = dict(cands[:n_multi])
    chosen.update(chars)
    total = float(sum(chosen.values()))
    pieces = sorted(chosen.items(), key=lambda pc: (-pc[1], pc[0]))
    vocab = [(t, 0.0) for t in specials] + [(p, float(np.log(c / total))) for p, c in pieces]
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok.to_str()


def make_hf_tokenizer(kind, tok_json):
    backend = Tokenizer.from_str(tok_json)
    if kind == "opt":
        return GPT2TokenizerFast(
            tokenizer_object=backend,
            bos_token="</s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="</s>",
            padding_side="left",
        )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
    )


# --------------------------------------------------------------------------
# C. Tiny models
# --------------------------------------------------------------------------

VISION_CFG = dict(
    image_size=28,
    patch_size=7,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    qkv_bias=True,
)

# Init scales are kept small so that the models are numerically tame: float32 rounding is not amplified
# (max |torch f32 - torch f64| <= MAX_F32_DRIFT at every stored stage, asserted below), so a second
# correct f32 implementation stays well within 1e-4 of these goldens. OPT uses larger learned decoder
# positions (pos_std) so that greedy search does not lock into repeating the input token (the lm_head
# is tied to embed_tokens). Seeds were picked (by running this script's checks) so that every golden
# greedy step has a clear top-1/top-2 margin, batch rows equal single rows, outputs are not degenerate
# and some unconstrained runs (batch rows included) stop at EOS; the OPT models also generate <image> (400).
MODEL_SPECS = {
    "opt-tiny": dict(kind="opt", legacy=False, num_query_tokens=4, qformer_layers=3, cross_attention_frequency=2,
                     seed=275, emb_std=0.2, gain=1.25, pos_std=1.5),
    "opt-tiny-legacy": dict(kind="opt", legacy=True, num_query_tokens=6, qformer_layers=4, cross_attention_frequency=3,
                            seed=76, emb_std=0.2, gain=1.25, pos_std=1.5),
    # T5: lm_head = 0.5 * normal(0, emb_std) - lm_head_neg * shared, which keeps the random decoder
    # from locking into "same token forever" loops under greedy search.
    "t5-tiny": dict(kind="t5", legacy=False, num_query_tokens=5, qformer_layers=3, cross_attention_frequency=2,
                    seed=11, emb_std=0.3, gain=0.7, lm_head_neg=1.0),
    "t5-tiny-legacy": dict(kind="t5", legacy=True, num_query_tokens=3, qformer_layers=3, cross_attention_frequency=2,
                           seed=10, emb_std=0.3, gain=0.7, lm_head_neg=1.0),
}

SINGLE_IMAGES = ["rgba_100x37.png", "gray_13x200.png", "photo_320x240.jpg", "tall_300x1000.png"]
SINGLE_PROMPTS = [("noprompt", None), ("photo", PROMPT_PHOTO), ("question", PROMPT_QUESTION)]
BATCH_CASES = [
    ("batch_mixed", ["rgb_640x480.png", "palette_64x64.png", "anim_40x30.gif"], [PROMPT_QUESTION, PROMPT_PHOTO, ""]),
    ("batch_noprompt", ["tiny_5x7.bmp", "wide_1000x150.png", "lossless_50x60.webp"], None),
]


def runs_for(kind):
    runs = [
        dict(name="max12_min12", max_new_tokens=12, min_new_tokens=12),
        dict(name="max20", max_new_tokens=20, min_new_tokens=None),
    ]
    if kind == "t5":
        runs.append(dict(name="max24_min24", max_new_tokens=24, min_new_tokens=24))
    return runs


def make_config(spec, vocab_size, image_token_index, eos_override=None):
    qformer = dict(
        hidden_size=32,
        num_hidden_layers=spec["qformer_layers"],
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=spec["cross_attention_frequency"],
    )
    if spec["kind"] == "opt":
        text = dict(
            model_type="opt",
            vocab_size=vocab_size,
            hidden_size=32,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=128,
            bos_token_id=2,
            pad_token_id=1,
            eos_token_id=2 if eos_override is None else eos_override,
        )
    else:
        text = dict(
            model_type="t5",
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            # the Salesforce conversion script sets bos_token_id=1 for Flan-T5
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
        )
    cfg = Blip2Config(
        vision_config=VISION_CFG,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=spec["num_query_tokens"],
        image_token_index=image_token_index,
    )
    if spec["kind"] == "t5":
        assert cfg.text_config.dense_act_fn == "gelu" and cfg.text_config.is_gated_act
    return cfg


def reinit_(model, seed, emb_std, gain, lm_head_neg=None, pos_std=None):
    """Re-initialise every parameter non-zero (HF zeroes biases and query tokens).
    pos_std (default emb_std) is the std of the OPT decoder's learned position embeddings."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                v = 0.1 * randn(p.shape)
                v[d : 2 * d] = 0.0  # k bias is structurally zero
                p.copy_(v)
            elif p.ndim == 1 and "norm" in name.lower() and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif p.ndim == 1:
                p.copy_(0.1 * randn(p.shape))
            elif any(
                k in name
                for k in ("embed_tokens", "shared", "embed_positions", "query_tokens", "class_embedding",
                          "position_embedding", "relative_attention_bias", "lm_head")
            ):
                std = pos_std if (pos_std is not None and "decoder.embed_positions" in name) else emb_std
                p.copy_(std * randn(p.shape))
            else:  # Linear / Conv2d weights: fan-in scaling
                fan_in = p[0].numel()
                p.copy_(randn(p.shape) * (gain / fan_in**0.5))
        if lm_head_neg is not None:
            lm = model.language_model.lm_head.weight
            lm.copy_(0.5 * lm - lm_head_neg * model.language_model.shared.weight)
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                assert torch.all(p[d : 2 * d] == 0)
            else:
                assert torch.count_nonzero(p) == p.numel(), name


# --------------------------------------------------------------------------
# Generation (reference) + golden tensors
# --------------------------------------------------------------------------

GEN_OUT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


def gen_kwargs(run):
    kw = dict(max_new_tokens=run["max_new_tokens"])
    if run["min_new_tokens"] is not None:
        kw["min_new_tokens"] = run["min_new_tokens"]
    return kw


def legacy_generate_le454(model, pixel_values, input_ids=None, attention_mask=None, **generate_kwargs):
    """transformers <= 4.54 `Blip2ForConditionalGeneration.generate` for configs WITHOUT
    image_token_index (the `else` branch that 4.57 removed), reproduced line by line and run
    on the 4.57 `generate` machinery."""
    batch_size = pixel_values.shape[0]
    language_model_inputs = model.get_image_features(pixel_values)
    language_attention_mask = torch.ones(language_model_inputs.size()[:-1], dtype=torch.long)
    if input_ids is None:
        start_tokens = [model.config.text_config.bos_token_id]
        input_ids = torch.tensor([start_tokens], dtype=torch.long).repeat(batch_size, 1)
    inputs_embeds = model.get_input_embeddings()(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs_embeds = torch.cat([language_model_inputs, inputs_embeds], dim=1)
    attention_mask = torch.cat([language_attention_mask, attention_mask], dim=1)
    if not model.language_model.config.is_encoder_decoder:
        generate_kwargs["max_length"] = generate_kwargs.get("max_length", 20) + language_model_inputs.shape[1] - 1
        generate_kwargs["min_length"] = generate_kwargs.get("min_length", 0) + language_model_inputs.shape[1]
    inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
    if not model.language_model.config.is_encoder_decoder:
        inputs["input_ids"] = input_ids
    return model.language_model.generate(**inputs, **generate_kwargs), input_ids, inputs_embeds, attention_mask


def legacy_generate_simple(model, pixel_values, input_ids, attention_mask, **generate_kwargs):
    """The same thing stated plainly: LM.generate(inputs_embeds=[queries; prompt embeds])."""
    language_model_inputs = model.get_image_features(pixel_values)
    embeds = torch.cat([language_model_inputs, model.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([torch.ones(language_model_inputs.shape[:2], dtype=torch.long), attention_mask], dim=1)
    return model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)


def no_prompt_ids(model, batch_size, legacy):
    cfg = model.config
    if legacy:
        ids = [cfg.text_config.bos_token_id]
    else:
        ids = [cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
    return torch.tensor([ids] * batch_size, dtype=torch.long)


class Runner:
    def __init__(self, name, spec, model, processor):
        self.name = name
        self.spec = spec
        self.model = model
        self.proc = processor
        self.kind = spec["kind"]
        self.legacy = spec["legacy"]
        tcfg = model.config.text_config
        self.eos = tcfg.eos_token_id
        self.pad = tcfg.pad_token_id
        self.model64 = None  # float64 copy, built on first use

    def encode(self, images, prompts):
        pil = [Image.open(p) for p in images]
        try:
            if prompts is None:
                enc = self.proc(images=pil, return_tensors="pt")
                return enc["pixel_values"], None, None
            enc = self.proc(images=pil, text=prompts, padding=True, return_tensors="pt")
            return enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
        finally:
            for im in pil:
                im.close()

    @torch.no_grad()
    def generate(self, images, prompts, run):
        """Returns dict with input ids, new tokens, margins, first-step logits."""
        pv, ids, mask = self.encode(images, prompts)
        B = pv.shape[0]
        kw = gen_kwargs(run)
        if not self.legacy:
            if ids is None:
                out = self.model.generate(pixel_values=pv, **kw, **GEN_OUT)
                ids = no_prompt_ids(self.model, B, legacy=False)
                mask = torch.ones_like(ids)
                source = "generate() default when no input_ids: [image_token_index]*Q + [text_config.bos_token_id]"
            else:
                out = self.model.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw, **GEN_OUT)
                source = "processor"
            lm_mask = mask
        else:
            source = "processor (no image tokens)"
            if ids is None:
                source = "<=4.54 generate() default when no input_ids: [[text_config.bos_token_id]]"
            out, ids, _, lm_mask = legacy_generate_le454(self.model, pv, ids, mask, **kw, **GEN_OUT)
            mask = torch.ones_like(ids) if mask is None else mask
        seq = out.sequences
        if self.kind == "opt":
            assert torch.equal(seq[:, : ids.shape[1]], ids), "OPT output must start with the input ids"
            new = seq[:, ids.shape[1] :]
        else:
            assert torch.all(seq[:, 0] == self.model.config.text_config.decoder_start_token_id)
            new = seq[:, 1:]
        if self.legacy:
            simple = legacy_generate_simple(self.model, pv, ids, mask, **kw)
            if self.kind == "t5":
                simple = simple[:, 1:]
            assert torch.equal(simple, new), "legacy reconstruction mismatch"
        assert len(out.scores) == new.shape[1]
        # margins on the processed scores at every step of every unfinished row
        margins = []
        finished = torch.zeros(B, dtype=torch.bool)
        for s, sc in enumerate(out.scores):
            top = torch.topk(sc, 2, dim=-1)
            for b in range(B):
                if finished[b]:
                    assert new[b, s].item() == self.pad
                    continue
                assert top.indices[b, 0].item() == new[b, s].item()
                margins.append((top.values[b, 0] - top.values[b, 1]).item())
                if new[b, s].item() == self.eos:
                    finished[b] = True
        new_l = new.tolist()
        trimmed = []
        for row in new_l:
            if self.eos in row:
                row = row[: row.index(self.eos) + 1]
            trimmed.append(row)
        texts = self.proc.batch_decode(new, skip_special_tokens=True)
        return dict(
            pixel_values=pv,
            input_ids=ids,
            attention_mask=mask,
            lm_attention_mask=lm_mask,
            input_ids_source=source,
            new_tokens=new_l,
            new_tokens_trimmed=trimmed,
            text=texts,
            min_margin=min(margins),
            hit_eos=[self.eos in r for r in new_l],
            first_logits=out.logits[0].clone(),
        )

    def _stages(self, m, pv, ids, mask):
        """Vision / Q-Former / projection outputs, first-step logits and (T5) encoder output of model m,
        computed with the model's own submodules."""
        lm_inputs, vision_out, qformer_out = m.get_image_features(pv, return_dict=True)
        t = {
            "vision_last_hidden_state": vision_out.last_hidden_state,
            "qformer_last_hidden_state": qformer_out.last_hidden_state,
            "language_model_inputs": lm_inputs,
        }
        B = pv.shape[0]
        dec = None
        if self.kind == "t5":
            dec = torch.full((B, 1), m.config.text_config.decoder_start_token_id, dtype=torch.long)
        if not self.legacy:
            out = m(pixel_values=pv, input_ids=ids, attention_mask=mask, decoder_input_ids=dec) if dec is not None \
                else m(pixel_values=pv, input_ids=ids, attention_mask=mask)
            assert torch.equal(out.vision_outputs.last_hidden_state, t["vision_last_hidden_state"])
            assert torch.equal(out.qformer_outputs.last_hidden_state, t["qformer_last_hidden_state"])
            t["first_logits"] = out.logits[:, -1, :] if self.kind == "opt" else out.logits[:, 0, :]
            if self.kind == "t5":
                t["encoder_last_hidden_state"] = out.language_model_outputs.encoder_last_hidden_state
        else:
            embeds = torch.cat([lm_inputs, m.get_input_embeddings()(ids)], dim=1)
            lm_mask = torch.cat([torch.ones(lm_inputs.shape[:2], dtype=torch.long), mask], dim=1)
            if self.kind == "opt":
                t["first_logits"] = m.language_model(inputs_embeds=embeds, attention_mask=lm_mask).logits[:, -1, :]
            else:
                out = m.language_model(inputs_embeds=embeds, attention_mask=lm_mask, decoder_input_ids=dec)
                t["first_logits"] = out.logits[:, 0, :]
                t["encoder_last_hidden_state"] = out.encoder_last_hidden_state
        return t

    @torch.no_grad()
    def tensors(self, pv, ids, mask, first_logits):
        """Intermediate tensors (float32 model) and their drift from the same model run in float64."""
        s32 = self._stages(self.model, pv, ids, mask)
        torch.testing.assert_close(s32["first_logits"], first_logits, rtol=1e-5, atol=1e-5)
        t = {"pixel_values": pv}
        t.update({k: v for k, v in s32.items() if k != "encoder_last_hidden_state"})
        t["first_logits"] = first_logits
        if "encoder_last_hidden_state" in s32:
            t["encoder_last_hidden_state"] = s32["encoder_last_hidden_state"]
        t = {k: v.detach().to(torch.float32).contiguous() for k, v in t.items()}
        # float32 rounding drift: max |torch f32 - torch f64| per stage, same weights, same inputs
        if self.model64 is None:
            self.model64 = copy.deepcopy(self.model).double()
        with exact_float64():
            s64 = self._stages(self.model64, pv.double(), ids, mask)
        drift = {}
        for k, v in s64.items():
            assert v.dtype == torch.float64, k
            drift[k] = (t[k].double() - v).abs().max().item()
            assert drift[k] <= MAX_F32_DRIFT, (self.name, k, drift[k])
        return t, drift


@contextlib.contextmanager
def exact_float64():
    """transformers' T5 computes the RMSNorm variance (`.to(torch.float32)`) and the attention softmax
    (`.float()`) in float32 even in a float64 model. Inside this context both stay in float64, so the
    float64 reference used for the drift measurement contains no float32 rounding."""
    from transformers.models.t5 import modeling_t5

    orig_float, orig_norm = torch.Tensor.float, modeling_t5.T5LayerNorm.forward

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else orig_float(self, *args, **kwargs)

    def norm_float64(self, hidden_states):
        if hidden_states.dtype != torch.float64:
            return orig_norm(self, hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    torch.Tensor.float, modeling_t5.T5LayerNorm.forward = keep_float64, norm_float64
    try:
        yield
    finally:
        torch.Tensor.float, modeling_t5.T5LayerNorm.forward = orig_float, orig_norm


IMAGE_LEVEL_TENSORS = ("pixel_values", "vision_last_hidden_state", "qformer_last_hidden_state", "language_model_inputs")


def compact_json(obj, indent=0):
    """JSON with one key per line but lists of scalars (and lists of such lists) kept on one line."""
    pad = " " * (indent + 1)

    def flat(o):
        return not isinstance(o, (dict, list)) or (isinstance(o, list) and all(flat(x) for x in o))

    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {compact_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and not flat(obj):
        items = [pad + compact_json(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def degenerate(row):
    """Degenerate: fewer than 3 distinct tokens, or one token repeated 6+ times in a row."""
    if len(row) < 6:
        return False
    longest, cur = 1, 1
    for a, b in zip(row, row[1:]):
        cur = cur + 1 if a == b else 1
        longest = max(longest, cur)
    return len(set(row)) < 3 or longest >= 6


def build_model(name, spec, tok_json, eos_override=None):
    tok = make_hf_tokenizer(spec["kind"], tok_json)
    ip = make_image_processor(28)
    proc = Blip2Processor(
        image_processor=ip,
        tokenizer=tok,
        num_query_tokens=None if spec["legacy"] else spec["num_query_tokens"],
    )
    image_token_id = tok.convert_tokens_to_ids("<image>")
    assert image_token_id == len(tok) - 1
    cfg = make_config(
        spec, vocab_size=len(tok), image_token_index=None if spec["legacy"] else image_token_id,
        eos_override=eos_override,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg).eval()
    reinit_(model, spec["seed"], spec["emb_std"], spec["gain"], spec.get("lm_head_neg"), spec.get("pos_std"))
    gc = model.language_model.generation_config
    assert not gc.do_sample and gc.num_beams == 1
    return model, proc, image_token_id


def all_pairs():
    pairs = []
    for img in SINGLE_IMAGES:
        for _, prompt in SINGLE_PROMPTS:
            pairs.append((img, prompt))
    for _, imgs, prompts in BATCH_CASES:
        for i, img in enumerate(imgs):
            pairs.append((img, None if prompts is None else prompts[i]))
    return pairs


def choose_legacy_eos(name, spec, tok_json, img_files, special_ids):
    """Pick text_config.eos_token_id so that some unconstrained (max20) runs stop early."""
    model, proc, _ = build_model(name, spec, tok_json)
    r = Runner(name, spec, model, proc)
    counts = {}
    early = set()
    run = dict(name="probe", max_new_tokens=20, min_new_tokens=None)
    for img, prompt in all_pairs():
        res = r.generate([img_files[img]], None if prompt is None else [prompt], run)
        row = res["new_tokens"][0]
        first_pos = {}
        for i, t in enumerate(row):
            first_pos.setdefault(t, i)
        for t, i in first_pos.items():
            if t in special_ids:
                continue
            if i < 3:
                early.add(t)
            elif i <= 15:
                counts[t] = counts.get(t, 0) + 1
    # most rows stopping between steps 3 and 15, and never within the first 3 steps
    best = sorted(((t, c) for t, c in counts.items() if t not in early), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return best


def make_model_fixtures(name, spec, tok_json, img_files, models_dir):
    mdir = os.path.join(models_dir, name)
    if os.path.isdir(mdir):
        shutil.rmtree(mdir)
    gdir = os.path.join(mdir, "golden")
    os.makedirs(gdir)

    eos_override = None
    if name == "opt-tiny-legacy":
        tmp_tok = make_hf_tokenizer("opt", tok_json)
        special = set(tmp_tok.all_special_ids) | {0, 1, 2, 3, len(tmp_tok)}
        eos_override = choose_legacy_eos(name, spec, tok_json, img_files, special)

    model, proc, image_token_id = build_model(name, spec, tok_json, eos_override)
    runner = Runner(name, spec, model, proc)

    cases = []
    tensors = {}
    margins_all = []

    image_tensor_owner = {}  # image -> case that stores its prompt-independent tensors
    drift_max = {}  # stage -> max over single cases of max |torch f32 - torch f64|

    def record_case(case_name, kind, images, prompts, want_tensors):
        runs_out = []
        first = None
        for run in runs_for(spec["kind"]):
            res = runner.generate([img_files[i] for i in images], prompts, run)
            for row in res["new_tokens_trimmed"]:
                assert not degenerate(row), (name, case_name, run["name"], row)
            assert res["min_margin"] >= MIN_MARGIN, (name, case_name, run["name"], res["min_margin"])
            margins_all.append(res["min_margin"])
            if first is None:
                first = res
            else:
                assert torch.equal(first["input_ids"], res["input_ids"])
                torch.testing.assert_close(first["first_logits"], res["first_logits"], rtol=0, atol=0)
            runs_out.append(
                dict(
                    name=run["name"],
                    max_new_tokens=run["max_new_tokens"],
                    min_new_tokens=run["min_new_tokens"],
                    new_tokens=res["new_tokens"],
                    new_tokens_trimmed=res["new_tokens_trimmed"],
                    hit_eos=res["hit_eos"],
                    text=res["text"],
                    min_margin=res["min_margin"],
                )
            )
        entry = dict(
            name=case_name,
            kind=kind,
            images=list(images),  # relative to tests/fixtures/images
            prompts=prompts,
            input_ids=first["input_ids"].tolist(),
            attention_mask=first["attention_mask"].tolist(),
            input_ids_source=first["input_ids_source"],
            runs=runs_out,
            min_margin=min(r["min_margin"] for r in runs_out),
        )
        if runner.legacy:
            entry["lm_attention_mask"] = first["lm_attention_mask"].tolist()
        if want_tensors:
            # pixel_values / vision / Q-Former / projection outputs depend on the image only: they are
            # stored once per image (under the first case using it) and referenced by tensor_keys.
            t, drift = runner.tensors(first["pixel_values"], first["input_ids"], first["attention_mask"],
                                      first["first_logits"])
            assert len(images) == 1
            owner = image_tensor_owner.setdefault(images[0], case_name)
            keys = {}
            for k, v in t.items():
                if k in IMAGE_LEVEL_TENSORS:
                    key = f"{owner}.{k}"
                    if owner == case_name:
                        tensors[key] = v
                    else:
                        assert torch.equal(tensors[key], v), (case_name, k)
                else:
                    key = f"{case_name}.{k}"
                    tensors[key] = v
                keys[k] = key
            entry["tensor_keys"] = keys
            entry["f32_drift"] = drift
            for k, v in drift.items():
                drift_max[k] = max(drift_max.get(k, 0.0), v)
        cases.append(entry)
        return entry

    for img in SINGLE_IMAGES:
        stem = os.path.splitext(img)[0]
        for pkey, prompt in SINGLE_PROMPTS:
            record_case(f"single_{stem}_{pkey}", "single", [img], None if prompt is None else [prompt], True)

    for case_name, imgs, prompts in BATCH_CASES:
        entry = record_case(case_name, "batch", imgs, prompts, False)
        # property: every batch row equals the single-row generation of the same (image, prompt)
        for run_entry, run in zip(entry["runs"], runs_for(spec["kind"])):
            for b, img in enumerate(imgs):
                single = runner.generate([img_files[img]], None if prompts is None else [prompts[b]], run)
                srow = single["new_tokens"][0]
                brow = run_entry["new_tokens"][b]
                assert brow[: len(srow)] == srow, (name, case_name, run["name"], b, brow, srow)
                assert all(t == runner.pad for t in brow[len(srow) :]), (name, case_name, b)
                assert single["text"][0] == run_entry["text"][b]

    # "" prompt is the same as no prompt (identical input ids) -- used in batch_mixed
    run0 = runs_for(spec["kind"])[0]
    a = runner.generate([img_files[SINGLE_IMAGES[0]]], None, run0)
    b = runner.generate([img_files[SINGLE_IMAGES[0]]], [""], run0)
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["new_tokens"] == b["new_tokens"]

    if name == "opt-tiny-legacy":
        assert any(
            any(r["hit_eos"]) and r["min_new_tokens"] is None and any(len(x) < r["max_new_tokens"] for x in r["new_tokens_trimmed"])
            for c in cases for r in c["runs"]
        ), "no unconstrained golden case stops at EOS"

    # ---- save checkpoint + processor in the Hub layout
    model.save_pretrained(mdir, safe_serialization=True)
    proc.save_pretrained(mdir)
    if name == "opt-tiny-legacy":
        rewrite_legacy_weights(mdir, model)
    verify_saved(mdir, model, proc, runner, spec, img_files)

    tcfg = model.config.text_config
    golden = dict(
        model=name,
        versions=VERSIONS,
        layout="legacy" if spec["legacy"] else "newer",
        language_model=spec["kind"],
        seed=spec["seed"],
        init=dict(
            embeddings_query_tokens_positions_lm_head="normal(0, emb_std)",
            linear_conv_weights="normal(0, gain / sqrt(fan_in))",
            norm_weights="1 + normal(0, 0.1)",
            biases="normal(0, 0.1) (vision qkv k-part exactly 0)",
            emb_std=spec["emb_std"],
            gain=spec["gain"],
            opt_decoder_positions=("normal(0, pos_std)" if spec.get("pos_std") is not None else "normal(0, emb_std)"),
            pos_std=spec.get("pos_std"),
            lm_head=("0.5 * normal(0, emb_std) - lm_head_neg * shared" if spec.get("lm_head_neg") else "tied to embed_tokens"),
            lm_head_neg=spec.get("lm_head_neg"),
        ),
        num_query_tokens=model.config.num_query_tokens,
        image_token_index=model.config.image_token_index,
        image_token_id_in_tokenizer=image_token_id,
        vocab_size=tcfg.vocab_size,
        bos_token_id=tcfg.bos_token_id,
        eos_token_id=tcfg.eos_token_id,
        pad_token_id=tcfg.pad_token_id,
        decoder_start_token_id=getattr(tcfg, "decoder_start_token_id", None) if spec["kind"] == "t5" else None,
        tokenizer_padding_side=proc.tokenizer.padding_side,
        decode="processor.batch_decode(new_tokens, skip_special_tokens=True) "
        f"(clean_up_tokenization_spaces={proc.tokenizer.clean_up_tokenization_spaces})",
        new_tokens_definition=(
            "OPT: output[:, input_len:] (input_len = len(input_ids)); T5: output[:, 1:] (drops decoder start 0). "
            "Rows that finished early are filled with pad_token_id up to the longest row, as returned. "
            "new_tokens_trimmed cuts after the first eos_token_id (EOS kept)."
        ),
        min_margin_definition=(
            "min over generated steps (rows not yet finished) of top1 - top2 of the processed scores "
            "(after min_new_tokens masking) used by greedy search"
        ),
        tensors_note=(
            "single cases have tensor_keys: {name: key in golden.safetensors}. Names: pixel_values [B,3,28,28], "
            "vision_last_hidden_state [B,17,32] (after post_layernorm), qformer_last_hidden_state [B,Q,32], "
            "language_model_inputs [B,Q,D] (after language_projection), first_logits [B,V] "
            "(raw logits of the first generation step)"
            + (", encoder_last_hidden_state [B,L,32] (T5 encoder output; L = Q + len(input_ids) for legacy, "
               "len(input_ids) for newer)" if spec["kind"] == "t5" else "")
            + ". The first four depend on the image only and are stored once per image (key prefix = the first "
            "case using that image, <case>.<name>); the others are stored per case. Batch cases have tokens only."
        ),
        min_margin=min(margins_all),
        f32_drift_definition=(
            "per single case, f32_drift[stage] = max |torch float32 - torch float64| over the stored tensor of that "
            "stage, the float64 run using the same weights (model.double()) and pixel_values.double(), with "
            "transformers' float32 casts (T5 RMSNorm variance, T5 softmax) kept in float64; f32_drift_max = max "
            f"over cases. The script asserts every value <= {MAX_F32_DRIFT:g}."
        ),
        f32_drift_max=drift_max,
        cases=cases,
    )
    if spec["legacy"]:
        golden["legacy_reconstruction"] = LEGACY_DOC[spec["kind"]]
    else:
        golden["no_prompt"] = (
            "transformers 4.57.6 Blip2ForConditionalGeneration.generate(pixel_values) without input_ids builds "
            "input_ids = [image_token_index]*num_query_tokens + [text_config.bos_token_id] (attention mask all ones) "
            "and replaces the image-token rows of the embeddings with the projected queries"
            + (" (OPT output includes these ids)." if spec["kind"] == "opt" else
               " (T5: bos_token_id is 1 = </s>, as in the Salesforce Flan-T5 configs; the same ids as the processor gives for text=\"\").")
        )
    with open(os.path.join(gdir, "golden.json"), "w") as f:
        f.write(compact_json(golden) + "\n")
    pt_save_file(tensors, os.path.join(gdir, "golden.safetensors"), metadata={"format": "pt"})
    return golden


LEGACY_DOC = {
    "opt": (
        "transformers 4.57.6 cannot generate for configs without image_token_index (generate() builds "
        "[None]*Q). Goldens reproduce the transformers <= 4.54 branch for that case, run on 4.57.6 generate(): "
        "input_ids = processor prompt ids WITHOUT image tokens (processor saved without num_query_tokens; no "
        "prompt => [[text_config.bos_token_id]]), inputs_embeds = cat([language_model_inputs, "
        "embed_tokens(input_ids)], dim=1), attention_mask = cat([ones(B,Q), attention_mask], dim=1), then "
        "language_model.generate(inputs_embeds=..., attention_mask=..., input_ids=input_ids, "
        "max_length=20+Q-1, min_length=Q, max_new_tokens=..., [min_new_tokens=...]) (the max/min_length "
        "adjustments of <= 4.54 are overridden by max_new_tokens/min_new_tokens). The output starts with "
        "input_ids; new tokens = output[:, len(input_ids):]. Checked equal to the plain "
        "language_model.generate(inputs_embeds=..., attention_mask=..., max_new_tokens=..., min_new_tokens=...) "
        "which returns only new tokens. Position ids = cumsum(lm_attention_mask)-1, so the queries take "
        "positions 0..Q-1."
    ),
    "t5": (
        "transformers 4.57.6 cannot generate for configs without image_token_index. Goldens reproduce the "
        "transformers <= 4.54 branch: input_ids = processor prompt ids WITHOUT image tokens (T5 tokenizer "
        "appends </s>=1; no prompt => [[text_config.bos_token_id]] = [[1]] since the Salesforce Flan-T5 configs "
        "set bos_token_id=1; this equals tokenizer(\"\") and LAVIS' empty prompt), encoder inputs_embeds = "
        "cat([language_model_inputs, shared(input_ids)], dim=1), attention_mask = cat([ones(B,Q), "
        "attention_mask], dim=1), then language_model.generate(inputs_embeds=..., attention_mask=..., "
        "max_new_tokens=..., [min_new_tokens=...]); output = [decoder_start 0] + new tokens."
    ),
}


def rewrite_legacy_weights(mdir, model):
    """Store the checkpoint the way old Hub snapshots did: q_bias/v_bias instead of qkv.bias,
    an explicit language_model.lm_head.weight, 2 shards + model.safetensors.index.json."""
    path = os.path.join(mdir, "model.safetensors")
    sd = pt_load_file(path)
    os.remove(path)
    out = {}
    for k, v in sd.items():
        if k.endswith("self_attn.qkv.bias"):
            d = v.shape[0] // 3
            assert torch.all(v[d : 2 * d] == 0)
            base = k[: -len("qkv.bias")]
            out[base + "q_bias"] = v[:d].clone()
            out[base + "v_bias"] = v[2 * d :].clone()
        else:
            out[k] = v
    lm_key = "language_model.lm_head.weight"
    assert lm_key not in out, "tied lm_head unexpectedly saved"
    out[lm_key] = out["language_model.model.decoder.embed_tokens.weight"].clone()
    assert torch.equal(model.language_model.lm_head.weight, out[lm_key])
    keys = sorted(out)
    nbytes = {k: out[k].numel() * out[k].element_size() for k in keys}
    total = sum(nbytes.values())
    shards = [[], []]
    acc = 0
    for k in keys:
        shards[0 if acc < total / 2 else 1].append(k)
        acc += nbytes[k]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        pt_save_file({k: out[k].contiguous() for k in names}, os.path.join(mdir, fname), metadata={"format": "pt"})
        for k in names:
            weight_map[k] = fname
    with open(os.path.join(mdir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


def verify_saved(mdir, model, proc, runner, spec, img_files):
    """Reload what was written and check it reproduces the in-memory reference."""
    ref_sd = model.state_dict()
    if os.path.exists(os.path.join(mdir, "model.safetensors.index.json")):
        with open(os.path.join(mdir, "model.safetensors.index.json")) as f:
            idx = json.load(f)
        sd = {}
        for fname in sorted(set(idx["weight_map"].values())):
            sd.update(pt_load_file(os.path.join(mdir, fname)))
        assert set(sd) == set(idx["weight_map"])
        for k in list(sd):
            if k.endswith("self_attn.q_bias"):
                base = k[: -len("q_bias")]
                q, v = sd.pop(k), sd.pop(base + "v_bias")
                sd[base + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        # transformers 4.57.6 cannot load this form (q_bias/v_bias are "unexpected", qkv.bias stays at
        # its zero init), so rebuild the model from config.json + the converted state dict.
        reloaded = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(mdir)).eval()
        res = reloaded.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys and set(res.missing_keys) <= {"language_model.lm_head.weight"}, res
    else:
        sd = pt_load_file(os.path.join(mdir, "model.safetensors"))
        reloaded = Blip2ForConditionalGeneration.from_pretrained(mdir, dtype=torch.float32).eval()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    for k, v in sd.items():
        assert torch.equal(v, ref_sd[k]), k
        assert v.dtype == torch.float32
    missing = set(ref_sd) - set(sd)
    # only tied weights may be absent from the file
    assert missing <= {"language_model.lm_head.weight", "language_model.encoder.embed_tokens.weight",
                       "language_model.decoder.embed_tokens.weight"}, missing
    # processor + raw tokenizer.json round trip
    proc2 = Blip2Processor.from_pretrained(mdir)
    raw = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    nq = None if spec["legacy"] else spec["num_query_tokens"]
    assert proc2.num_query_tokens == nq
    for prompt in [PROMPT_PHOTO, PROMPT_QUESTION, ""]:
        a = proc(text=[prompt])["input_ids"][0]
        b = proc2(text=[prompt])["input_ids"][0]
        assert a == b
        assert raw.encode(prompt).ids == a
    with Image.open(img_files["rgba_100x37.png"]) as im:
        e1 = proc(images=im, text=PROMPT_PHOTO, return_tensors="pt")
        e2 = proc2(images=im, text=PROMPT_PHOTO, return_tensors="pt")
    assert torch.equal(e1["input_ids"], e2["input_ids"])
    assert torch.equal(e1["pixel_values"], e2["pixel_values"])
    # the reloaded checkpoint + processor generate the same tokens
    r2 = Runner(runner.name, spec, reloaded, proc2)
    for prompts in (None, [PROMPT_QUESTION]):
        for run in runs_for(spec["kind"]):
            a = runner.generate([img_files["photo_320x240.jpg"]], prompts, run)
            b = r2.generate([img_files["photo_320x240.jpg"]], prompts, run)
            assert a["new_tokens"] == b["new_tokens"] and a["text"] == b["text"]
            assert torch.equal(a["first_logits"], b["first_logits"])


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    img_files = make_images(os.path.join(out, "images"))
    print("images written")
    make_preprocess(img_files, os.path.join(out, "preprocess"))
    print("preprocess goldens written")

    tok_json = {"opt": train_opt_tokenizer_json(), "t5": train_t5_tokenizer_json()}
    # training must be deterministic
    assert tok_json["opt"] == train_opt_tokenizer_json() and tok_json["t5"] == train_t5_tokenizer_json()

    models_dir = os.path.join(out, "models")
    os.makedirs(models_dir, exist_ok=True)
    for name, spec in MODEL_SPECS.items():
        g = make_model_fixtures(name, spec, tok_json[spec["kind"]], img_files, models_dir)
        drift = ", ".join(f"{k} {v:.2e}" for k, v in g["f32_drift_max"].items())
        print(f"{name}: {len(g['cases'])} cases, min margin {g['min_margin']:.4g}, eos {g['eos_token_id']}, "
              f"f32 drift max: {drift}")
    print("done")


if __name__ == "__main__":
    main()
