#!/usr/bin/env python3
"""Goldens for images at sizes other than the checkpoint's (`interpolate_pos_encoding=True`),
from the pinned reference (tools/pins.py).

For each tiny fixture checkpoint (tests/fixtures/models/opt-tiny, t5-tiny; image_size 28,
patch 7) and each size in SIZES (one square, one not), the processor resizes to that size
(`size={"height": H, "width": W}`) and transformers 4.57.6 runs:
- `get_image_features(pixel_values, interpolate_pos_encoding=True, return_dict=True)`: the
  vision `last_hidden_state` and `pooler_output`, the Q-Former `last_hidden_state` and the
  language projection, per image, to models/<name>/golden/sizes.safetensors
  (key `<stem>@<H>x<W>.<stage>`);
- greedy `generate(..., interpolate_pos_encoding=True)`: each image alone (no prompt, and with
  PROMPT), and all IMAGES in one batch (no prompt), the new tokens and the smallest top-1/top-2
  margin of any step, to models/<name>/golden/sizes.json.
Nothing expected is typed by hand.

    /tmp/ref/bin/python tools/make_size_goldens.py [--fixtures tests/fixtures]
"""

import argparse
import json
import os

from pins import check_versions  # tools/pins.py

VERSIONS = check_versions()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Blip2ForConditionalGeneration, Blip2Processor  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

MODELS = ["opt-tiny", "t5-tiny"]
IMAGES = ["photo_320x240.jpg", "tall_300x1000.png", "rgba_100x37.png"]
# (height, width): a larger square grid (7x7 patches) and a non-square one (3x5) that shrinks
# one axis of the checkpoint's 4x4 grid and stretches the other. (42x42 and 56x56, also tried,
# gave greedy margins under MIN_MARGIN on these random weights.)
SIZES = [(49, 49), (21, 35)]
PROMPT = "a photo of"
MAX_NEW_TOKENS = 10
# Greedy tokens are compared exactly: every step's top-1/top-2 margin must be far above f32 noise.
MIN_MARGIN = 1e-3


def load_images(fixtures, names):
    # As opened, like the other golden scripts: the processor converts to RGB itself.
    return [Image.open(os.path.join(fixtures, "images", n)) for n in names]


class Model:
    def __init__(self, model_dir):
        self.model = Blip2ForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        self.proc = Blip2Processor.from_pretrained(model_dir)
        cfg = self.model.config
        self.kind = "t5" if cfg.text_config.is_encoder_decoder else "opt"
        self.eos = self.model.language_model.generation_config.eos_token_id
        self.pad = self.model.language_model.generation_config.pad_token_id

    def encode(self, images, size, prompts=None):
        h, w = size
        kw = dict(images=images, size={"height": h, "width": w}, return_tensors="pt")
        if prompts is not None:
            kw.update(text=prompts, padding=True)
        enc = self.proc(**kw)
        assert tuple(enc["pixel_values"].shape[-2:]) == (h, w), enc["pixel_values"].shape
        return enc

    @torch.no_grad()
    def features(self, pixels):
        projected, vision, qformer = self.model.get_image_features(
            pixels, interpolate_pos_encoding=True, return_dict=True)
        return {"vision": vision.last_hidden_state, "vision_pooled": vision.pooler_output,
                "qformer": qformer.last_hidden_state, "projected": projected}

    @torch.no_grad()
    def generate(self, enc):
        kw = dict(pixel_values=enc["pixel_values"], interpolate_pos_encoding=True,
                  max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                  return_dict_in_generate=True, output_scores=True)
        if "input_ids" in enc:
            kw.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out = self.model.generate(**kw)
        seq = out.sequences
        steps = len(out.scores)
        new = seq[:, seq.shape[1] - steps:]
        if self.kind == "t5":
            assert steps == seq.shape[1] - 1
        margins, rows = [], []
        for b in range(new.shape[0]):
            row = []
            for s in range(steps):
                token = new[b, s].item()
                if row and row[-1] == self.eos:
                    assert token == self.pad
                    continue
                top = torch.topk(out.scores[s][b], 2)
                assert top.indices[0].item() == token
                margins.append((top.values[0] - top.values[1]).item())
                row.append(token)
            rows.append(row)
        return rows, min(margins)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    args = ap.parse_args()
    for name in MODELS:
        model_dir = os.path.join(args.fixtures, "models", name)
        m = Model(model_dir)
        tensors, cases = {}, []
        for size in SIZES:
            tag = f"{size[0]}x{size[1]}"
            images = load_images(args.fixtures, IMAGES)
            enc = m.encode(images, size)
            stages = m.features(enc["pixel_values"])
            for i, image in enumerate(IMAGES):
                stem = os.path.splitext(image)[0]
                for stage, t in stages.items():
                    tensors[f"{stem}@{tag}.{stage}"] = t[i].contiguous()
                # Alone: the batch's features row equals the single image's (recorded to check
                # the reference itself batches exactly).
                alone = m.features(m.encode([images[i]], size)["pixel_values"])
                assert torch.allclose(alone["projected"][0], stages["projected"][i], atol=1e-6)
                for prompt in [None, PROMPT]:
                    one = m.encode([images[i]], size, None if prompt is None else [prompt])
                    rows, margin = m.generate(one)
                    cases.append(dict(name=f"{stem}@{tag}{'' if prompt is None else '_prompt'}",
                                      kind="single", size=list(size), images=[image], prompt=prompt,
                                      tokens=rows, min_margin=margin))
            rows, margin = m.generate(enc)
            cases.append(dict(name=f"batch@{tag}", kind="batch", size=list(size), images=IMAGES, prompt=None,
                              tokens=rows, min_margin=margin))
        worst = min(c["min_margin"] for c in cases)
        assert worst >= MIN_MARGIN, f"{name}: a greedy margin of {worst} is too close to call"
        out = os.path.join(model_dir, "golden")
        save_file(tensors, os.path.join(out, "sizes.safetensors"))
        with open(os.path.join(out, "sizes.json"), "w") as f:
            json.dump({"versions": VERSIONS, "images": IMAGES, "sizes": [list(s) for s in SIZES],
                       "max_new_tokens": MAX_NEW_TOKENS,
                       "features_call": "get_image_features(pixel_values, interpolate_pos_encoding=True, return_dict=True)",
                       "features_keys": "<image stem>@<H>x<W>.<stage>; stages as in features.json, row of the batch",
                       "generate_call": "generate(pixel_values, [input_ids, attention_mask,] interpolate_pos_encoding=True, "
                                        f"max_new_tokens={MAX_NEW_TOKENS}, do_sample=False, num_beams=1)",
                       "tokens_definition": "the new tokens of each row, up to and including EOS",
                       "min_margin_definition": "smallest top-1 minus top-2 processed score over every step of every row",
                       "cases": cases}, f, indent=1)
            f.write("\n")
        print(f"{name}: {len(tensors)} tensors, {len(cases)} cases, smallest margin {worst:.4g}")


if __name__ == "__main__":
    main()
