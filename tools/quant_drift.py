#!/usr/bin/env python3
"""Where quantisation drift comes from, measured in transformers (the reference) on a real
BLIP-2 architecture with random weights: per stage (vision output, Q-Former output, each
language-model layer, first-step logits), the cosine between f32 and a variant of the same
model, for

  q8_0      the weights as `--quantize q8_0` holds them (ggml's blocks of 32 along the input:
            scale = max|w| / 127 stored as f16, q = round(w / scale)), dequantised; the
            activations stay f32 (the project's own kernels quantise them too; BENCHMARKS.md
            found that this does not change the drift)
  int8      per-output-channel int8 (`--quantize int8`'s weights), dequantised
  noise     f32 weights plus Gaussian noise of the same RMS as q8_0's error, tensor by tensor:
            any perturbation of that size, with no structure of the scheme's

on the layers the project quantises (the vision encoder's and the language model's linear
layers, its head included; the Q-Former stays f32), for two sets of random weights:

  checkpoint  the values tools/make_large_checkpoint.py writes (every weight drawn from
              N(0, 0.02^2), norm weights 1): the checkpoints BENCHMARKS.md measures
  hf          transformers' own initialisation of the architecture (`_init_weights`: for T5,
              scales by fan-in, as the model was designed to be trained from; for BLIP-2's
              vision tower, std 1e-10, which leaves it close to the identity and below f16's
              range for q8_0's scales: use --scope lm there)

--scope lm perturbs the language model only; --t5-q-scale multiplies every T5 attention's
query weights after building (a test of the mechanism: T5 does not divide its attention logits
by sqrt(d_kv)). For T5 it also prints how peaked encoder self-attention is, layer by layer.
The input is random pixels (seed 0) and "Question: what is in the picture? Short answer:" in
the fixture tokenizer's ids.

Usage: quant_drift.py --arch flan-t5-xl [--init checkpoint hf] [--variants q8_0 int8 noise]
       [--scope all|lm] [--t5-q-scale F] [--json OUT]
Prints one table per init and writes --json. Needs about the f32 model's size in RAM (16 GB
for flan-t5-xl). Uses the pinned reference (tools/requirements.txt).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import make_large_checkpoint as mlc  # noqa: E402
from transformers import Blip2ForConditionalGeneration  # noqa: E402



def prompt_ids(arch):
    from tokenizers import Tokenizer
    spec = mlc.ARCHS[arch]
    fixtures = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "models")
    tok = Tokenizer.from_file(os.path.join(fixtures, spec["tokenizer_from"], "tokenizer.json"))
    return tok.encode("Question: what is in the picture? Short answer:").ids


def build(arch, init):
    config, names = mlc.tensor_names(arch)
    if init == "hf":
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(config)
    else:
        from transformers.modeling_utils import no_init_weights
        with no_init_weights():  # parameters left unset (all are written below), buffers made
            model = Blip2ForConditionalGeneration(config)
        state = model.state_dict(keep_vars=True)
        block = mlc.random_block()
        with torch.no_grad():
            for shard in mlc.plan_shards(names):
                for j, name in enumerate(shard):
                    flat = state[name].view(-1)
                    at = 0
                    for chunk in mlc.tensor_chunks(name, j, flat.numel(), block):
                        flat[at:at + chunk.size] = torch.from_numpy(np.ascontiguousarray(chunk))
                        at += chunk.size
        model.tie_weights()
    return model.eval(), config


def quantised_linears(model, scope="all"):
    """The linear layers `--quantize` touches: vision encoder and language model (`scope`
    "lm": the language model's only)."""
    roots = [("vision_model", model.vision_model), ("language_model", model.language_model)]
    for prefix, root in roots[1:] if scope == "lm" else roots:
        for name, mod in root.named_modules():
            if isinstance(mod, torch.nn.Linear):
                yield f"{prefix}.{name}", mod


def q8_0(w):
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    d16 = d.half().float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(b * inv).clamp(-127, 127)  # ggml: roundf(x * id)
    return (q * d16).reshape(n, k)


def int8_channel(w):
    d = w.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(w * inv).clamp(-127, 127) * d


def apply(model, variant, scope):
    gen = torch.Generator().manual_seed(1)
    rel = []
    with torch.no_grad():
        for _, lin in quantised_linears(model, scope):
            w = lin.weight.data
            if variant == "q8_0":
                new = q8_0(w)
            elif variant == "int8":
                new = int8_channel(w)
            elif variant == "noise":
                err = (q8_0(w) - w).pow(2).mean().sqrt()
                new = w + torch.randn(w.shape, generator=gen) * err
            else:
                raise ValueError(variant)
            rel.append(((new - w).norm() / w.norm()).item())
            w.copy_(new)
    return float(np.mean(rel))


def stages(model, config, arch, pixel_values):
    ids = prompt_ids(arch)
    n_query = config.num_query_tokens
    input_ids = torch.tensor([[config.image_token_index] * n_query + ids])
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids,
                  attention_mask=torch.ones_like(input_ids), output_hidden_states=True,
                  return_dict=True)
    t5 = config.text_config.model_type == "t5"
    if t5:
        kwargs["decoder_input_ids"] = torch.tensor([[config.text_config.decoder_start_token_id]])
    if t5:
        kwargs["output_attentions"] = True
    with torch.no_grad():
        out = model(**kwargs)
    if t5:
        # How peaked self-attention is: the mean over heads and queries of the largest weight.
        peak = [float(a[0].amax(-1).mean()) for a in out.language_model_outputs.encoder_attentions]
        print("encoder self-attention, mean largest weight by layer: "
              + " ".join(f"{p:.2f}" for p in peak), flush=True)
    s = {"vision": out.vision_outputs.last_hidden_state[0],
         "qformer": out.qformer_outputs.last_hidden_state[0]}
    lm = out.language_model_outputs
    if t5:
        for i, h in enumerate(lm.encoder_hidden_states):
            s[f"encoder.{i}"] = h[0]
        for i, h in enumerate(lm.decoder_hidden_states):
            s[f"decoder.{i}"] = h[0]
        s["logits"] = lm.logits[0, -1:]
    else:
        for i, h in enumerate(lm.hidden_states):
            s[f"decoder.{i}"] = h[0]
        s["logits"] = lm.logits[0, -1:]
    return {k: v.float().clone() for k, v in s.items()}


def cosine_rows(a, b):
    """The smallest per-token cosine."""
    c = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float(c.min())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(mlc.ARCHS), default="flan-t5-xl")
    ap.add_argument("--init", nargs="+", choices=["checkpoint", "hf"], default=["checkpoint", "hf"])
    ap.add_argument("--variants", nargs="+", choices=["q8_0", "int8", "noise"],
                    default=["q8_0", "int8", "noise"])
    ap.add_argument("--scope", choices=["all", "lm"], default="all",
                    help="perturb the vision encoder and the language model, or the latter only")
    ap.add_argument("--t5-q-scale", type=float, default=1.0,
                    help="multiply every T5 attention's query weights by this after building "
                         "(1/8 = 1/sqrt(d_kv): attention logits at the scale OPT's 1/sqrt(d) gives)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    report = {"arch": args.arch, "torch": torch.__version__, "scope": args.scope,
              "t5_q_scale": args.t5_q_scale, "results": {}}

    def built(init):
        model, config = build(args.arch, init)
        if args.t5_q_scale != 1.0:
            with torch.no_grad():
                for name, mod in model.language_model.named_modules():
                    if name.endswith(("SelfAttention", "EncDecAttention")):
                        mod.q.weight.mul_(args.t5_q_scale)
        return model, config

    for init in args.init:
        t0 = time.time()
        model, config = built(init)
        ref = stages(model, config, args.arch, pixel_values)
        top = int(ref["logits"].argmax())
        margin = torch.unique(ref["logits"][0]).sort(descending=True).values[:2]
        print(f"[{init}] f32 built and run in {time.time() - t0:.0f} s; logits std "
              f"{float(ref['logits'].std()):.3g}, top-1 margin (to the next distinct value) {float(margin[0] - margin[1]):.3g}",
              flush=True)
        del model
        rows = {}
        for variant in args.variants:
            t0 = time.time()
            model, _ = built(init)
            rel = apply(model, variant, args.scope)
            got = stages(model, config, args.arch, pixel_values)
            del model
            rows[variant] = {
                "weight_rel_error": rel,
                "cosine": {k: cosine_rows(ref[k], got[k]) for k in ref},
                "top1_same": int(got["logits"].argmax()) == top,
            }
            print(f"[{init}] {variant}: {time.time() - t0:.0f} s", flush=True)
        report["results"][init] = rows
        keys = list(ref)
        pick = [k for k in keys if not k.startswith(("encoder.", "decoder."))]
        layered = [k for k in keys if k.startswith(("encoder.", "decoder."))]
        pick[2:2] = layered[::4] + [layered[-1]] if layered else []
        print(f"\n{args.arch}, {init} weights, perturbed: {args.scope}, T5 query scale "
              f"{args.t5_q_scale}: min per-token cosine against f32")
        print("| stage | " + " | ".join(args.variants) + " |")
        print("| --- |" + " --- |" * len(args.variants))
        for k in dict.fromkeys(pick):
            print(f"| {k} | " + " | ".join(f"{rows[v]['cosine'][k]:.6f}" for v in args.variants) + " |")
        print("| top-1 same | " + " | ".join(str(rows[v]["top1_same"]) for v in args.variants) + " |")
        print("| weight error (rel.) | " + " | ".join(f"{rows[v]['weight_rel_error']:.2e}" for v in args.variants) + " |\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
