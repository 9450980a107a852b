//! Query embeddings (vision encoder + Q-Former + projection) of recent images, keyed by their
//! pixel values: several questions about one image run the vision encoder once. Identical images
//! admitted together are computed once as well. A hit compares the full pixel values, so a hash
//! collision can never hand one image another's features.

use std::collections::VecDeque;

use candle_core::Tensor;

use super::Job;
use crate::metrics::Metrics;

struct Entry {
    key: u64,
    pixels: Vec<f32>,
    /// [1, Q, H]
    embeds: Tensor,
}

pub struct FeatureCache {
    capacity: usize,
    /// Least recently used first.
    entries: VecDeque<Entry>,
}

/// FNV-1a over the f32 bit patterns: a bucket key only (hits compare the pixels).
fn key(pixels: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in pixels {
        h ^= u64::from(v.to_bits());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl FeatureCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: VecDeque::new(),
        }
    }

    fn lookup(&mut self, key: u64, pixels: &[f32]) -> Option<Tensor> {
        let at = self
            .entries
            .iter()
            .position(|e| e.key == key && e.pixels == pixels)?;
        let entry = self.entries.remove(at)?;
        let embeds = entry.embeds.clone();
        self.entries.push_back(entry);
        Some(embeds)
    }

    fn insert(&mut self, key: u64, pixels: &[f32], embeds: Tensor) {
        if self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            key,
            pixels: pixels.to_vec(),
            embeds,
        });
    }

    /// The jobs' query embeddings [B, Q, H], computing (with `compute`, on a batch of distinct
    /// images) only those not cached.
    pub fn query_embeds(
        &mut self,
        jobs: &[Job],
        metrics: &Metrics,
        compute: impl FnOnce(&[&[f32]]) -> Result<Tensor, String>,
    ) -> Result<Tensor, String> {
        let pixels: Vec<&[f32]> = jobs.iter().map(|j| j.pixel_values.as_slice()).collect();
        self.query_embeds_of(&pixels, metrics, compute)
    }

    /// As [`query_embeds`](Self::query_embeds), for images given as pixel values.
    pub fn query_embeds_of(
        &mut self,
        images: &[&[f32]],
        metrics: &Metrics,
        compute: impl FnOnce(&[&[f32]]) -> Result<Tensor, String>,
    ) -> Result<Tensor, String> {
        if self.capacity == 0 {
            return compute(images);
        }
        let keys: Vec<u64> = images.iter().map(|p| key(p)).collect();
        let mut cached: Vec<Option<Tensor>> = Vec::with_capacity(images.len());
        // For each job not cached: which computed row is its image.
        let mut source: Vec<usize> = Vec::with_capacity(images.len());
        let mut misses: Vec<usize> = Vec::new();
        for (i, image) in images.iter().enumerate() {
            let hit = self.lookup(keys[i], image);
            let found = hit.is_some();
            cached.push(hit);
            if found {
                source.push(usize::MAX);
                metrics.image_cache.with_label_values(&["hit"]).inc();
                continue;
            }
            match misses
                .iter()
                .position(|&m| keys[m] == keys[i] && images[m] == *image)
            {
                Some(u) => {
                    source.push(u);
                    metrics.image_cache.with_label_values(&["hit"]).inc();
                }
                None => {
                    source.push(misses.len());
                    misses.push(i);
                    metrics.image_cache.with_label_values(&["miss"]).inc();
                }
            }
        }
        let mut computed: Vec<Tensor> = Vec::with_capacity(misses.len());
        if !misses.is_empty() {
            let pixels: Vec<&[f32]> = misses.iter().map(|&m| images[m]).collect();
            let embeds = compute(&pixels)?;
            for (u, &m) in misses.iter().enumerate() {
                // An owned copy: a cached row must not keep the whole batch's tensor alive.
                let row = embeds
                    .narrow(0, u, 1)
                    .and_then(|r| r.copy())
                    .map_err(|e| e.to_string())?;
                self.insert(keys[m], images[m], row.clone());
                computed.push(row);
            }
        }
        let rows: Vec<Tensor> = cached
            .into_iter()
            .zip(source)
            .map(|(hit, s)| hit.unwrap_or_else(|| computed[s].clone()))
            .collect();
        Tensor::cat(&rows, 0).map_err(|e| e.to_string())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn job(value: f32) -> Job {
        let prompt = crate::prompt::Prompt { text_ids: vec![2] };
        Job::new(vec![value; 12], prompt, Default::default()).0
    }

    /// `compute` stands for the vision tower: row i is filled with the image's first pixel.
    fn fake(pixels: &[&[f32]], calls: &mut Vec<usize>) -> Result<Tensor, String> {
        calls.push(pixels.len());
        let data: Vec<f32> = pixels.iter().flat_map(|p| vec![p[0]; 4]).collect();
        Tensor::from_vec(data, (pixels.len(), 2, 2), &Device::Cpu).map_err(|e| e.to_string())
    }

    fn firsts(t: &Tensor) -> Vec<f32> {
        t.flatten_from(1)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn identical_images_are_computed_once_and_recent_ones_reused() {
        let metrics = Metrics::new().unwrap();
        let mut cache = FeatureCache::new(2);
        let mut calls = Vec::new();
        let jobs = [job(1.0), job(2.0), job(1.0)];
        let out = cache
            .query_embeds(&jobs, &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [1.0, 2.0, 1.0]);
        assert_eq!(calls, [2]);
        // Both recent: no compute at all.
        let out = cache
            .query_embeds(&[job(2.0), job(1.0)], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [2.0, 1.0]);
        assert_eq!(calls, [2]);
        // A third image evicts the least recently used (2.0).
        cache
            .query_embeds(&[job(3.0)], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(cache.len(), 2);
        let out = cache
            .query_embeds(&[job(2.0), job(1.0)], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [2.0, 1.0]);
        assert_eq!(calls, [2, 1, 1]);
        let hits = metrics.image_cache.with_label_values(&["hit"]).get();
        let misses = metrics.image_cache.with_label_values(&["miss"]).get();
        assert_eq!((hits, misses), (4, 4));
    }

    #[test]
    fn a_hash_collision_is_not_a_hit() {
        let metrics = Metrics::new().unwrap();
        let mut cache = FeatureCache::new(4);
        let mut calls = Vec::new();
        let a = job(1.0);
        let out = cache
            .query_embeds(std::slice::from_ref(&a), &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [1.0]);
        // Forge an entry with a's key but other pixels: a lookup of a must not return it.
        cache.entries.clear();
        cache.insert(
            key(&a.pixel_values),
            &[9.0; 12],
            Tensor::zeros((1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let out = cache
            .query_embeds(&[a], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [1.0]);
        assert_eq!(calls, [1, 1]);
    }
}
