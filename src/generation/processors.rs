//! Logits processors in transformers' order (`GenerationMixin._get_logits_processor`):
//! repetition penalty, no-repeat n-gram, min-new-tokens EOS mask, then, when sampling, the
//! temperature, top-k and top-p warpers. Each works on one row of scores in place; `context` is
//! the ids the reference's processors see for that row (the prompt part, then the new tokens).

use super::GenerationParams;

/// `RepetitionPenaltyLogitsProcessor`: every id seen in `context` has its score divided by the
/// penalty when positive and multiplied by it when negative.
pub fn repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(context.len());
    for &id in context {
        if seen.insert(id) {
            if let Some(s) = scores.get_mut(id as usize) {
                *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
            }
        }
    }
}

/// `NoRepeatNGramLogitsProcessor`: bans every id that would complete an n-gram already present
/// in `context`.
pub fn no_repeat_ngram(scores: &mut [f32], context: &[u32], n: usize) {
    if n == 0 || context.len() + 1 < n {
        return;
    }
    let prefix = &context[context.len() + 1 - n..];
    for window in context.windows(n) {
        if &window[..n - 1] == prefix {
            if let Some(s) = scores.get_mut(window[n - 1] as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// `MinNewTokensLengthLogitsProcessor`: EOS is impossible until `min_new_tokens` exist.
pub fn min_new_tokens(scores: &mut [f32], generated: usize, min_new: usize, eos: &[u32]) {
    if generated < min_new {
        for &e in eos {
            if let Some(s) = scores.get_mut(e as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// The processors every decoding mode runs. The context the penalties see is `prefix` (the
/// prompt part) then `generated`; it is only assembled when a penalty is on, so the usual
/// decode step copies nothing.
pub fn process(
    scores: &mut [f32],
    prefix: &[u32],
    generated: &[u32],
    p: &GenerationParams,
    eos: &[u32],
) {
    if p.repetition_penalty != 1.0 || p.no_repeat_ngram_size > 0 {
        let context: Vec<u32> = prefix.iter().chain(generated).copied().collect();
        repetition_penalty(scores, &context, p.repetition_penalty);
        no_repeat_ngram(scores, &context, p.no_repeat_ngram_size);
    }
    min_new_tokens(scores, generated.len(), p.min_new_tokens, eos);
}

/// Temperature, top-k and top-p warpers (`min_tokens_to_keep` = 1), as transformers applies
/// them when `do_sample` is set. Filtered entries become -inf.
pub fn warp(scores: &mut [f32], p: &GenerationParams) {
    if p.temperature != 1.0 {
        for s in scores.iter_mut() {
            *s /= p.temperature;
        }
    }
    if let Some(k) = p.top_k.filter(|&k| k > 0 && k < scores.len()) {
        let mut sorted: Vec<f32> = scores.to_vec();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let threshold = sorted[k - 1];
        for s in scores.iter_mut() {
            if *s < threshold {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    if p.top_p < 1.0 {
        // Ascending sort; drop the low tail whose cumulative probability is <= 1 - top_p,
        // always keeping the most likely token.
        let probs = softmax(scores);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        // torch compares the f32 cumulative sum with the f32 rounding of (1 - top_p) taken in
        // f64; accumulate in f64 so 50k small terms do not drift.
        let threshold = (1.0f64 - p.top_p as f64) as f32;
        let mut cumulative = 0f64;
        let last = order.len() - 1;
        for (rank, &i) in order.iter().enumerate() {
            cumulative += probs[i] as f64;
            if (cumulative as f32) <= threshold && rank < last {
                scores[i] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Softmax in f32 (max-subtracted); -inf entries get probability 0.
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// log_softmax in f32, as torch computes it: `x - max - log(sum(exp(x - max)))`.
pub fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
    let log_sum = sum.ln();
    scores.iter().map(|&s| s - max - log_sum).collect()
}

/// Index of the largest score; the first one on ties, as torch's argmax.
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws an index from the softmax of `scores` with one uniform number in [0, 1).
pub fn sample(scores: &[f32], uniform: f64) -> u32 {
    let probs = softmax(scores);
    let mut acc = 0f64;
    let mut last_possible = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_possible = i;
            acc += p as f64;
            if uniform < acc {
                return i as u32;
            }
        }
    }
    last_possible as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_shrinks_seen_scores_toward_zero_side() {
        let mut s = vec![2.0, -2.0, 1.0];
        repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn no_repeat_ngram_bans_the_completing_token() {
        let mut s = vec![0.0; 5];
        // context ends with "1 2"; "1 2 3" occurred, so 3 is banned for n = 3.
        no_repeat_ngram(&mut s, &[1, 2, 3, 4, 1, 2], 3);
        assert_eq!(s[3], f32::NEG_INFINITY);
        assert!(s.iter().enumerate().all(|(i, v)| i == 3 || *v == 0.0));
    }

    #[test]
    fn top_k_and_top_p_keep_the_best() {
        let p = GenerationParams {
            do_sample: true,
            top_k: Some(2),
            ..GenerationParams::default()
        };
        let mut s = vec![1.0, 3.0, 2.0, 0.0];
        warp(&mut s, &p);
        assert_eq!(s.iter().filter(|v| v.is_finite()).count(), 2);
        let p = GenerationParams {
            do_sample: true,
            top_k: None,
            top_p: 0.01,
            ..GenerationParams::default()
        };
        let mut s = vec![1.0, 3.0, 2.0, 0.0];
        warp(&mut s, &p);
        assert_eq!(s.iter().filter(|v| v.is_finite()).count(), 1);
        assert!(s[1].is_finite());
    }

    #[test]
    fn sampling_never_picks_a_filtered_token() {
        let s = vec![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(sample(&s, u), 1);
        }
    }
}
