//! Beam search as transformers 4.57 runs it (`GenerationMixin._beam_search`): per step, the
//! processed log-probabilities of every running beam plus its score, the top
//! `max(2, 1 + n_eos) * num_beams` continuations, EOS (or the length limit) among the top
//! `num_beams` of them moving a hypothesis to the finished set with score
//! `sum_logprobs / generated_len ** length_penalty`, and the `early_stopping=False` heuristic
//! (stop once the best running beam, scored at the current length, cannot beat the worst of
//! `num_beams` finished hypotheses).

use super::processors::{log_softmax, process};
use super::GenerationParams;

/// The reference's stand-in for -inf in beam bookkeeping.
const NEG_LARGE: f32 = -1.0e9;

#[derive(Debug, Clone)]
struct Beam {
    tokens: Vec<u32>,
    score: f32,
    /// This beam's row among the rows the request had this step.
    row: usize,
}

#[derive(Debug, Clone)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f32,
    /// Taken from the running beams when the request was cancelled.
    pub cancelled: bool,
}

#[derive(Debug, Clone)]
pub struct BeamSearch {
    num_beams: usize,
    running: Vec<Beam>,
    /// At most `num_beams`, best first.
    finished: Vec<Hypothesis>,
    done: bool,
}

fn length_norm(score: f32, length: usize, penalty: f64) -> f32 {
    score / ((length as f64).powf(penalty) as f32)
}

impl BeamSearch {
    /// Starts from the prefill's single row: every beam begins as that row, and only the first
    /// one counts (the others start at -1e9 in the reference, so never reach the top-k).
    pub fn new(num_beams: usize) -> Self {
        Self {
            num_beams,
            running: vec![Beam {
                tokens: Vec::new(),
                score: 0.0,
                row: 0,
            }],
            finished: Vec::new(),
            done: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The best continuations of every running beam as (score, beam * vocab + token), best
    /// first (ties by index): as many as can still leave `num_beams` running after EOS hits.
    fn candidates(
        &self,
        rows: &[Vec<f32>],
        context_prefix: &[u32],
        params: &GenerationParams,
        eos: &[u32],
    ) -> Vec<(f32, usize)> {
        let vocab = rows.first().map(Vec::len).unwrap_or(0);
        let mut candidates: Vec<(f32, usize)> = Vec::with_capacity(self.running.len() * vocab);
        for (bi, beam) in self.running.iter().enumerate() {
            let mut lp = log_softmax(&rows[beam.row]);
            process(&mut lp, context_prefix, &beam.tokens, params, eos);
            candidates.extend(
                lp.iter()
                    .enumerate()
                    .map(|(v, &s)| (beam.score + s, bi * vocab + v)),
            );
        }
        let keep = (2usize.max(1 + eos.len()) * self.num_beams).min(candidates.len());
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        candidates.truncate(keep);
        candidates
    }

    /// Runs one step over `rows` (the request's logits rows, raw). Returns the running beams
    /// for the next step as (parent row, token), in order.
    pub fn step(
        &mut self,
        rows: &[Vec<f32>],
        context_prefix: &[u32],
        params: &GenerationParams,
        eos: &[u32],
    ) -> Vec<(usize, u32)> {
        let vocab = rows.first().map(Vec::len).unwrap_or(0);
        let gen_len = self.running[0].tokens.len();
        let candidates = self.candidates(rows, context_prefix, params, eos);

        let at_limit = gen_len + 1 >= params.max_new_tokens;
        let hits: Vec<bool> = candidates
            .iter()
            .map(|&(_, flat)| at_limit || eos.contains(&((flat % vocab) as u32)))
            .collect();
        let extend = |flat: usize| {
            let parent = &self.running[flat / vocab];
            let mut tokens = parent.tokens.clone();
            tokens.push((flat % vocab) as u32);
            (parent.row, tokens)
        };

        // Finished: EOS or the limit among the top `num_beams` continuations.
        let mut merged = std::mem::take(&mut self.finished);
        for (i, &(score, flat)) in candidates.iter().enumerate().take(self.num_beams) {
            if hits[i] {
                let (_, tokens) = extend(flat);
                merged.push(Hypothesis {
                    score: length_norm(score, gen_len + 1, params.length_penalty),
                    tokens,
                    cancelled: false,
                });
            }
        }
        merged.sort_by(|a, b| b.score.total_cmp(&a.score));
        merged.truncate(self.num_beams);
        self.finished = merged;

        // Running: the best `num_beams` continuations that did not stop.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        let adjusted = |i: usize| candidates[i].0 + if hits[i] { NEG_LARGE } else { 0.0 };
        order.sort_by(|&a, &b| adjusted(b).total_cmp(&adjusted(a)).then(a.cmp(&b)));
        let mut next = Vec::with_capacity(self.num_beams);
        let mut running = Vec::with_capacity(self.num_beams);
        for &i in order.iter().take(self.num_beams) {
            let (parent_row, tokens) = extend(candidates[i].1);
            next.push((parent_row, *tokens.last().expect("one token pushed")));
            running.push(Beam {
                tokens,
                score: adjusted(i),
                row: running.len(),
            });
        }
        self.running = running;

        let all_hit = hits.iter().all(|&h| h);
        let heuristic_done = self.finished.len() == self.num_beams && {
            let best_possible =
                length_norm(self.running[0].score, gen_len + 1, params.length_penalty);
            let worst_finished = self.finished.last().map(|h| h.score).unwrap_or(NEG_LARGE);
            best_possible <= worst_finished
        };
        if all_hit || heuristic_done {
            self.done = true;
            return Vec::new();
        }
        next
    }

    /// Stops the search; running beams (length-normalised) fill the finished set where it has
    /// room, so a cancelled request still returns its best partial sequences.
    pub fn cancel(&mut self, length_penalty: f64) {
        for beam in std::mem::take(&mut self.running) {
            if beam.tokens.is_empty() {
                continue;
            }
            self.finished.push(Hypothesis {
                score: length_norm(beam.score, beam.tokens.len(), length_penalty),
                tokens: beam.tokens,
                cancelled: true,
            });
        }
        self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.finished.truncate(self.num_beams);
        self.done = true;
    }

    /// The best `n` finished hypotheses, best first.
    pub fn best(&self, n: usize) -> Vec<Hypothesis> {
        self.finished.iter().take(n).cloned().collect()
    }
}
