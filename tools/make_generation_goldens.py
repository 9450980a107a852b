#!/usr/bin/env python3
"""Golden data for the decoding modes of BLIP-2 `generate()` (beam search, length penalty,
num_return_sequences, repetition penalty, no-repeat n-grams, min/max new tokens).

Usage:
    python tools/make_generation_goldens.py [--fixtures tests/fixtures]

Reads the tiny checkpoints `models/{opt-tiny,t5-tiny}` and the images under `--fixtures` at run time
(nothing is copied), calls `Blip2ForConditionalGeneration.generate(**processor(...), **params)` exactly as a
user would, and writes `generation/<model>.json`. Nothing expected is typed by hand; the script is
deterministic (single-threaded torch, fixed candidate order) and needs no network.

Robustness: random tiny models have near-tied scores. Every case records `min_gap`, the smallest score
margin that decided its output (see `gap_definition` in the JSON); the inputs of each case are the first
(image, prompt) candidates, in a fixed order, whose `min_gap` is at least MIN_GAP. Batched cases are also
checked row by row against single-image runs with the same parameters.
"""

import argparse
import json
import math
import os

from pins import check_versions  # tools/pins.py

VERSIONS = check_versions()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Blip2ForConditionalGeneration, Blip2Processor  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

MIN_GAP = 1e-4
MODELS = ["opt-tiny", "t5-tiny"]
Q = "Question: what is in the picture? Answer:"
PHOTO = "a photo of"
PROMPTS = [None, PHOTO, Q]
# candidate images, in the order they are tried
IMAGES = [
    "photo_320x240.jpg",
    "rgb_640x480.png",
    "tall_300x1000.png",
    "gray_13x200.png",
    "palette_64x64.png",
    "wide_1000x150.png",
    "rgba_100x37.png",
    "lossless_50x60.webp",
    "tiny_5x7.bmp",
    "anim_40x30.gif",
]
SINGLE_CANDIDATES = [(img, p) for img in IMAGES for p in PROMPTS]


def P(max_new_tokens, num_beams=1, length_penalty=1.0, num_return_sequences=1, min_new_tokens=0,
      repetition_penalty=1.0, no_repeat_ngram_size=0):
    return dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
        length_penalty=length_penalty,
        num_return_sequences=num_return_sequences,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        do_sample=False,
        early_stopping=False,
    )


# (name, params, start offset into the candidate list). Batched cases are listed separately.
SINGLE_CASES = [
    # (name, params, start offset into SINGLE_CANDIDATES, prefer a candidate that stops with EOS early)
    ("beam3_lp1", P(12, num_beams=3), 0, False),
    ("beam3_lp-1", P(12, num_beams=3, length_penalty=-1.0), 4, True),
    ("beam5_lp1_nrs3", P(12, num_beams=5, num_return_sequences=3), 8, False),
    ("beam5_lp-1_nrs3", P(12, num_beams=5, length_penalty=-1.0, num_return_sequences=3), 12, True),
    ("beam3_lp1_nrs3", P(12, num_beams=3, num_return_sequences=3), 16, False),
    ("beam3_min6_nrs2", P(12, num_beams=3, min_new_tokens=6, num_return_sequences=2), 20, True),
    ("beam3_rep1.2_ngram2_nrs2", P(12, num_beams=3, repetition_penalty=1.2, no_repeat_ngram_size=2,
                                   num_return_sequences=2), 1, False),
    ("greedy_rep1.3", P(12, repetition_penalty=1.3), 5, False),
    ("greedy_rep0.8", P(12, repetition_penalty=0.8), 9, False),
    ("greedy_ngram2", P(12, no_repeat_ngram_size=2), 13, False),
    ("greedy_ngram3", P(12, no_repeat_ngram_size=3), 17, False),
    ("greedy_min10_max14", P(14, min_new_tokens=10), 21, True),
]
BATCH_CASES = [
    # (name, params, prompts, start offset into IMAGES, prefer early EOS). Different prompt lengths in one call
    # (OPT pads left, T5 right; the processor pads the text part only, after the image tokens).
    # "" gives the same ids as no prompt.
    ("batch3_beam3_nrs2", P(12, num_beams=3, num_return_sequences=2), [Q, PHOTO, ""], 0, False),
    ("batch2_beam5_lp-1_nrs3", P(12, num_beams=5, length_penalty=-1.0, num_return_sequences=3), ["", PHOTO], 3,
     True),
]


def gen_kwargs(params):
    """Only the non-default parameters are passed, as a user would."""
    kw = dict(max_new_tokens=params["max_new_tokens"], do_sample=False)
    if params["min_new_tokens"]:
        kw["min_new_tokens"] = params["min_new_tokens"]
    if params["num_beams"] > 1:
        kw["num_beams"] = params["num_beams"]
        kw["length_penalty"] = params["length_penalty"]
    else:
        assert params["length_penalty"] == 1.0
    if params["num_return_sequences"] > 1:
        kw["num_return_sequences"] = params["num_return_sequences"]
    if params["repetition_penalty"] != 1.0:
        kw["repetition_penalty"] = params["repetition_penalty"]
    if params["no_repeat_ngram_size"]:
        kw["no_repeat_ngram_size"] = params["no_repeat_ngram_size"]
    return kw


def _gap(hi, lo):
    """hi - lo for two ranked scores; None when both are placeholders (-1e9 / -inf, irrelevant)."""
    if hi < -1e8 and lo < -1e8:
        return None
    if lo == -math.inf:
        return math.inf
    return hi - lo


class BeamProbe:
    """Wraps three beam-search helpers of the language model (instance attributes, removed afterwards) to
    measure the margins that decide the beam search output:
      run   - per step: gap between the num_beams-th and (num_beams+1)-th best continuation that does not
              finish (these become the running beams);
      cut   - per step, when a finishing candidate (EOS, or any candidate at the max-length step) is ranked
              num_beams-th or (num_beams+1)-th among all candidates: gap between those two (only the top
              num_beams candidates may be finalised);
      topk  - the K-th vs (K+1)-th candidate (K = 2*num_beams) when fewer than num_beams+1 candidates of the
              top K do not finish;
      merge - per step with new finished hypotheses: gap between the num_beams-th and (num_beams+1)-th of the
              merged (old + new, length-penalised) finished scores;
      stop  - |best possible running score - worst finished score| of the early-stop heuristic, when all
              beams of an item have finished;
      order - at the end: gaps between consecutive returned sequence scores (and the last returned vs the
              next finished hypothesis)."""

    def __init__(self, lm, eos, num_return_sequences):
        self.lm = lm
        self.eos = eos
        self.nrs = num_return_sequences
        self.gaps = []  # (kind, batch item, step, value)
        self.last_acc = None
        self.last_beam_scores = None

    def __enter__(self):
        lm = self.lm
        orig_topk = lm._get_top_k_continuations
        orig_update = lm._update_finished_beams
        orig_stop = lm._check_early_stop_heuristic

        def topk_wrap(*args, **kw):
            assert not args
            self.last_acc = kw["accumulated_log_probs"].detach().clone()
            self.vocab = kw["vocab_size"]
            self.K = kw["beams_to_keep"]
            return orig_topk(**kw)

        def update_wrap(*args, **kw):
            assert not args
            self._analyse_step(kw)
            out = orig_update(**kw)
            self.last_beam_scores = out[1].detach().clone()
            return out

        def stop_wrap(*args, **kw):
            assert not args
            self._analyse_stop(kw)
            return orig_stop(**kw)

        lm._get_top_k_continuations = topk_wrap
        lm._update_finished_beams = update_wrap
        lm._check_early_stop_heuristic = stop_wrap
        return self

    def __exit__(self, *exc):
        for a in ("_get_top_k_continuations", "_update_finished_beams", "_check_early_stop_heuristic"):
            del self.lm.__dict__[a]

    def add(self, kind, b, step, v):
        if v is not None:
            self.gaps.append((kind, b, step, float(v)))

    def _analyse_step(self, kw):
        nb, K, V = kw["num_beams"], self.K, self.vocab
        step = kw["cur_len"] - kw["decoder_prompt_len"]
        hits = kw["next_token_hits_stopping_criteria"]  # [B, K]
        acc = self.last_acc
        B = acc.shape[0]
        vals, idx = torch.topk(acc, K + nb + 2, dim=-1)
        assert torch.equal(vals[:, :K], kw["topk_log_probs"])
        for b in range(B):
            at_max = bool(hits[b].all())
            fin = [(at_max or int(i) % V == self.eos) for i in idx[b].tolist()]
            assert fin[:K] == hits[b].tolist(), (fin[:K], hits[b].tolist())
            v = vals[b].tolist()
            if not at_max:
                nonfin = [x for x, f in zip(v, fin) if not f]
                self.add("run", b, step, _gap(nonfin[nb - 1], nonfin[nb]))
                if sum(1 for f in fin[:K] if not f) <= nb:
                    self.add("topk", b, step, _gap(v[K - 1], v[K]))
            if fin[nb - 1] or fin[nb]:
                self.add("cut", b, step, _gap(v[nb - 1], v[nb]))
        # finished-hypothesis cut, computed as _update_finished_beams does
        lp = kw["length_penalty"]
        adj = kw["topk_log_probs"] / ((kw["cur_len"] + 1 - kw["decoder_prompt_len"]) ** lp)
        full = torch.all(kw["is_sent_finished"], dim=-1, keepdim=True) & (kw["early_stopping"] is True)
        ok = hits & kw["top_num_beam_mask"][None, :] & kw["is_early_stop_heuristic_unsatisfied"] & ~full
        for b in range(B):
            if not bool(ok[b].any()):
                continue
            merged = [x for x in kw["beam_scores"][b].tolist() if x > -1e8]
            merged += [x for x, o in zip(adj[b].tolist(), ok[b].tolist()) if o]
            merged.sort(reverse=True)
            if len(merged) > nb:
                self.add("merge", b, step, _gap(merged[nb - 1], merged[nb]))

    def _analyse_stop(self, kw):
        es, lp = kw["early_stopping"], kw["length_penalty"]
        if es == "never" and lp > 0.0:
            L = kw["max_length"] - kw["decoder_prompt_len"]
        else:
            L = kw["cur_len"] - kw["decoder_prompt_len"]
        best = kw["running_beam_scores"][:, 0] / (L**lp)
        worst = kw["beam_scores"].min(dim=-1).values
        for b in range(best.shape[0]):
            if bool(kw["is_early_stop_heuristic_unsatisfied"][b]) and bool(kw["is_sent_finished"][b].all()):
                self.add("stop", b, L, abs(best[b].item() - worst[b].item()))

    def finish(self):
        s = self.last_beam_scores
        for b in range(s.shape[0]):
            row = [x for x in s[b].tolist() if x > -1e8]
            for i in range(min(self.nrs, len(row) - 1)):
                self.add("order", b, None, _gap(row[i], row[i + 1]))


class Runner:
    def __init__(self, fixtures, name):
        mdir = os.path.join(fixtures, "models", name)
        self.name = name
        self.img_dir = os.path.join(fixtures, "images")
        self.model = Blip2ForConditionalGeneration.from_pretrained(mdir).eval()
        # defaults, as a user gets them: fast tokenizer, slow (Pillow) BlipImageProcessor for this saved config
        self.proc = Blip2Processor.from_pretrained(mdir)
        assert self.proc.tokenizer.is_fast and type(self.proc.image_processor).__name__ == "BlipImageProcessor"
        self.lm = self.model.language_model
        self.kind = "t5" if self.model.config.text_config.is_encoder_decoder else "opt"
        gc = self.lm.generation_config
        self.eos, self.pad = gc.eos_token_id, gc.pad_token_id
        assert isinstance(self.eos, int) and isinstance(self.pad, int)
        assert gc.early_stopping is False and gc.length_penalty == 1.0 and gc.num_beams == 1
        assert self.model.generation_config.early_stopping is False
        self.padding_side = self.proc.tokenizer.padding_side

    def inputs(self, images, prompts):
        pil = [Image.open(os.path.join(self.img_dir, f)) for f in images]
        try:
            if prompts is None:
                return self.proc(images=pil, return_tensors="pt")
            return self.proc(images=pil, text=prompts, padding=True, return_tensors="pt")
        finally:
            for im in pil:
                im.close()

    def trim(self, row, max_new):
        if self.eos in row:
            return row[: row.index(self.eos) + 1]
        assert len(row) == max_new, (row, max_new)  # no EOS: it ran to max_new_tokens, no pad fill
        return row

    @torch.no_grad()
    def run(self, images, prompts, params):
        inputs = self.inputs(images, prompts)
        kw = gen_kwargs(params)
        nb, nrs = params["num_beams"], params["num_return_sequences"]
        plain = self.model.generate(**inputs, **kw)
        extra = dict(return_dict_in_generate=True, output_scores=True)
        if nb > 1:
            with BeamProbe(self.lm, self.eos, nrs) as probe:
                out = self.model.generate(**inputs, **kw, **extra)
            probe.finish()
            gaps = probe.gaps
        else:
            out = self.model.generate(**inputs, **kw, **extra)
        seq = out.sequences
        assert torch.equal(seq, plain), "return_dict_in_generate changed the tokens"
        if self.kind == "opt":
            ids = inputs["input_ids"] if "input_ids" in inputs else None
            if ids is not None:
                rep = ids.repeat_interleave(nrs, dim=0)
                assert torch.equal(seq[:, : ids.shape[1]], rep), "OPT output must start with the input ids"
                new = seq[:, ids.shape[1]:]
            else:  # no prompt: generate() builds [image_token_index]*Q + [bos]
                cfg = self.model.config
                built = [cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
                assert all(r[: len(built)] == built for r in seq.tolist())
                new = seq[:, len(built):]
        else:
            assert torch.all(seq[:, 0] == self.lm.generation_config.decoder_start_token_id)
            new = seq[:, 1:]
        assert new.shape[0] == len(images) * nrs
        rows = [self.trim(r, params["max_new_tokens"]) for r in new.tolist()]
        for r in rows:
            n_new = len(r)
            assert n_new >= params["min_new_tokens"] or (self.eos not in r), r
        if nb == 1:
            gaps = []
            finished = [False] * new.shape[0]
            assert len(out.scores) == new.shape[1]
            for s, sc in enumerate(out.scores):
                top = torch.topk(sc, 2, dim=-1)
                for b in range(sc.shape[0]):
                    if finished[b]:
                        assert new[b, s].item() == self.pad
                        continue
                    assert top.indices[b, 0].item() == new[b, s].item()
                    gaps.append(("greedy", b, s, (top.values[b, 0] - top.values[b, 1]).item()))
                    if new[b, s].item() == self.eos:
                        finished[b] = True
            scores = None
        else:
            scores = out.sequences_scores.tolist()
            # beam_indices give each row's generated length
            lens = (out.beam_indices >= 0).sum(dim=1).tolist()
            assert lens == [len(r) for r in rows], (lens, rows)
        texts = self.proc.batch_decode(new, skip_special_tokens=True)
        texts_trim = [self.proc.decode(r, skip_special_tokens=True) for r in rows]
        assert texts == texts_trim
        min_gap = min(g[3] for g in gaps)
        worst = min(gaps, key=lambda g: g[3])
        return dict(rows=rows, scores=scores, texts=texts, min_gap=min_gap, worst=worst, steps=len(out.scores),
                    hit_eos=[self.eos in r for r in rows])


def case_json(name, images, prompts, params, res):
    return dict(
        name=name,
        images=images,
        prompts=prompts,
        params=params,
        sequences=res["rows"],
        sequences_scores=res["scores"],
        texts=res["texts"],
        min_gap=res["min_gap"],
        hit_eos=res["hit_eos"],
    )


def greedy_params(params):
    g = dict(params)
    g.update(num_beams=1, length_penalty=1.0, num_return_sequences=1)
    return g


def early_eos(res, params):
    return any(e and len(r) < params["max_new_tokens"] for e, r in zip(res["hit_eos"], res["rows"]))


def make_model(fixtures, name, log):
    r = Runner(fixtures, name)
    cases = []
    stats = []
    for cname, params, offset, want_eos in SINGLE_CASES:
        # first candidate with min_gap >= MIN_GAP; with want_eos, the first such one that also finishes
        # with EOS before max_new_tokens, if any
        chosen = None
        tried = 0
        for k in range(len(SINGLE_CANDIDATES)):
            img, prompt = SINGLE_CANDIDATES[(offset + k) % len(SINGLE_CANDIDATES)]
            prompts = None if prompt is None else [prompt]
            res = r.run([img], prompts, params)
            tried += 1
            if res["min_gap"] < MIN_GAP:
                continue
            if chosen is None:
                chosen = (img, prompts, res)
            if not want_eos or early_eos(res, params):
                chosen = (img, prompts, res)
                break
        assert chosen is not None, f"{name} {cname}: no candidate has min_gap >= {MIN_GAP}"
        img, prompts, res = chosen
        info = dict(name=cname, images=[img], prompts=prompts, tried=tried, min_gap=res["min_gap"],
                    worst=res["worst"][:3], hit_eos=res["hit_eos"], lens=[len(x) for x in res["rows"]],
                    steps=res["steps"])
        if params["num_beams"] > 1:
            g = r.run([img], prompts, greedy_params(params))
            info["top_row_equals_greedy"] = g["rows"][0] == res["rows"][0]
        stats.append(info)
        cases.append(case_json(cname, [img], prompts, params, res))

    for cname, params, prompt_list, offset, want_eos in BATCH_CASES:
        n = len(prompt_list)
        nrs = params["num_return_sequences"]
        tried = 0
        chosen = None
        for k in range(len(IMAGES)):
            imgs = [IMAGES[(offset + k + j) % len(IMAGES)] for j in range(n)]
            tried += 1
            res = r.run(imgs, prompt_list, params)
            if res["min_gap"] < MIN_GAP:
                continue
            ok = True
            single_gap = math.inf
            for j, (img, p) in enumerate(zip(imgs, prompt_list)):
                s = r.run([img], [p], params)
                single_gap = min(single_gap, s["min_gap"])
                rows = res["rows"][j * nrs:(j + 1) * nrs]
                sc = res["scores"][j * nrs:(j + 1) * nrs]
                if s["rows"] != rows or s["texts"] != res["texts"][j * nrs:(j + 1) * nrs]:
                    ok = False
                    log(f"  {name} {cname}: batch row {j} != single run for {imgs}, trying others")
                    break
                # float noise only (padding changes the reduction shapes); lp -1 scales the scores by the length
                assert all(abs(a - b) <= 1e-4 + 2e-5 * abs(a) for a, b in zip(s["scores"], sc)), (s["scores"], sc)
            if not ok or single_gap < MIN_GAP:
                continue
            if chosen is None:
                chosen = (imgs, res, single_gap)
            if not want_eos or early_eos(res, params):
                chosen = (imgs, res, single_gap)
                break
        assert chosen is not None, f"{name} {cname}: no candidate batch passes"
        imgs, res, single_gap = chosen
        cases.append(case_json(cname, imgs, prompt_list, params, res))
        stats.append(dict(name=cname, images=imgs, prompts=prompt_list, tried=tried, min_gap=res["min_gap"],
                          single_min_gap=single_gap, worst=res["worst"][:3], hit_eos=res["hit_eos"],
                          lens=[len(x) for x in res["rows"]], steps=res["steps"]))

    # the beam cases must not all be trivial
    beam = [s for s in stats if "top_row_equals_greedy" in s or s["name"].startswith("batch")]
    assert any(any(e and ln < 12 for e, ln in zip(s["hit_eos"], s["lens"])) for s in beam), \
        f"{name}: no beam case finishes with EOS before max_new_tokens"
    assert any(s.get("top_row_equals_greedy") is False for s in beam), f"{name}: every beam case equals greedy"

    doc = dict(
        versions=VERSIONS,
        model=name,
        eos_token_id=r.eos,
        pad_token_id=r.pad,
        padding_side=r.padding_side,
        min_gap_threshold=MIN_GAP,
        gap_definition=(
            "greedy: min over steps (rows not yet finished) of top1 - top2 of the processed scores. "
            "beam: min over steps of (a) the gap between the num_beams-th and (num_beams+1)-th best accumulated "
            "continuation that does not finish, (b) the gap between ranks num_beams and num_beams+1 over all "
            "continuations when one of them finishes (EOS, or every candidate at the max-length step), "
            "(c) ranks 2*num_beams vs 2*num_beams+1 when the top 2*num_beams hold fewer than num_beams+1 open "
            "continuations, (d) ranks num_beams vs num_beams+1 of the merged length-penalised finished "
            "hypotheses, (e) |best possible running score - worst finished score| of the early-stop heuristic "
            "once all beams of an item are finished, (f) consecutive gaps of the final scores down to the "
            "first one not returned. Batched cases: the batched call (each row also equals a single-image run)."
        ),
        sequences_definition=(
            "new tokens only (OPT: output[:, input_ids.shape[1]:], T5: output[:, 1:]), cut after the first EOS "
            "(EOS kept), pad fill removed; rows image-major, then the num_return_sequences of that image in "
            "score order. texts = processor.batch_decode(untrimmed new tokens, skip_special_tokens=True)."
        ),
        cases=cases,
    )
    return doc, stats


def dumps(obj, indent=0):
    """JSON with scalar lists (and lists of scalar lists) on one line."""
    pad = " " * indent

    def scalar_list(o):
        return isinstance(o, list) and all(not isinstance(x, (list, dict)) for x in o)

    if isinstance(obj, dict):
        items = [f'{pad} {json.dumps(k)}: {dumps(v, indent + 1).lstrip()}' for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if scalar_list(obj):
            return pad + json.dumps(obj, ensure_ascii=False)
        if all(scalar_list(x) for x in obj):
            return pad + "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        return pad + "[\n" + ",\n".join(dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return pad + json.dumps(obj, ensure_ascii=False)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=os.path.join(here, "..", "tests", "fixtures"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    fixtures = os.path.abspath(args.fixtures)
    log = (lambda *a: None) if args.quiet else print
    out_dir = os.path.join(fixtures, "generation")
    os.makedirs(out_dir, exist_ok=True)
    docs = {}
    for name in MODELS:  # every check passes before anything is written
        docs[name], stats = make_model(fixtures, name, log)
        log(f"{name}: {len(docs[name]['cases'])} cases")
        for st in stats:
            log("  " + json.dumps(st, ensure_ascii=False))
    for name, doc in docs.items():
        path = os.path.join(out_dir, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(dumps(doc) + "\n")
        log(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
