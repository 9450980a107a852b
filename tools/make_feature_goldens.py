#!/usr/bin/env python3
"""Golden image features for /v1/features, from the pinned reference (tools/pins.py).

For each tiny fixture checkpoint (tests/fixtures/models/opt-tiny, t5-tiny) and a few fixture
images, runs `Blip2ForConditionalGeneration.get_image_features(pixel_values, return_dict=True)`
(transformers 4.57.6) on the processor's pixels and writes, per image, the vision
`last_hidden_state` and `pooler_output`, the Q-Former `last_hidden_state` and the language
projection to models/<name>/golden/features.safetensors (+ features.json: versions, images).
Nothing expected is typed by hand.

    /tmp/ref/bin/python tools/make_feature_goldens.py [--fixtures tests/fixtures]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    args = ap.parse_args()
    for name in MODELS:
        model_dir = os.path.join(args.fixtures, "models", name)
        model = Blip2ForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        processor = Blip2Processor.from_pretrained(model_dir)
        tensors = {}
        for image in IMAGES:
            pil = Image.open(os.path.join(args.fixtures, "images", image))
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                projected, vision, qformer = model.get_image_features(pixels, return_dict=True)
            stem = os.path.splitext(image)[0]
            tensors[f"{stem}.vision"] = vision.last_hidden_state[0].contiguous()
            tensors[f"{stem}.vision_pooled"] = vision.pooler_output[0].contiguous()
            tensors[f"{stem}.qformer"] = qformer.last_hidden_state[0].contiguous()
            tensors[f"{stem}.projected"] = projected[0].contiguous()
        out = os.path.join(model_dir, "golden")
        save_file(tensors, os.path.join(out, "features.safetensors"))
        with open(os.path.join(out, "features.json"), "w") as f:
            json.dump({"versions": VERSIONS, "images": IMAGES,
                       "call": "Blip2ForConditionalGeneration.get_image_features(pixel_values, return_dict=True)",
                       "stages": {"vision": "vision_outputs.last_hidden_state[0]",
                                  "vision_pooled": "vision_outputs.pooler_output[0]",
                                  "qformer": "query_outputs.last_hidden_state[0]",
                                  "projected": "language_model_inputs[0]"}}, f, indent=1)
            f.write("\n")
        print(f"{name}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
