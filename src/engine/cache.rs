//! Query embeddings (vision encoder + Q-Former + projection) of recent images, keyed by their
//! size and pixel values: several questions about one image run the vision encoder once.
//! Identical images admitted together are computed once as well. A hit compares the size and the
//! full pixel values, so a hash collision can never hand one image another's features.

use std::collections::VecDeque;

use candle_core::Tensor;

use crate::metrics::Metrics;
use crate::preprocess::ImageSize;

/// One image as the vision encoder takes it: `pixels` [3, H, W] row-major at `size`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Image<'a> {
    pub pixels: &'a [f32],
    pub size: ImageSize,
}

struct Entry {
    key: u64,
    size: ImageSize,
    pixels: Vec<f32>,
    /// [1, Q, H]
    embeds: Tensor,
}

pub struct FeatureCache {
    capacity: usize,
    /// Least recently used first.
    entries: VecDeque<Entry>,
}

/// FNV-1a over the size and the f32 bit patterns: a bucket key only (hits compare the
/// pixels).
fn key(image: &Image) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let size = [image.size.height as u64, image.size.width as u64];
    for v in size
        .into_iter()
        .chain(image.pixels.iter().map(|v| u64::from(v.to_bits())))
    {
        h ^= v;
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

    fn lookup(&mut self, key: u64, image: &Image) -> Option<Tensor> {
        let at = self
            .entries
            .iter()
            .position(|e| e.key == key && e.size == image.size && e.pixels == image.pixels)?;
        let entry = self.entries.remove(at)?;
        let embeds = entry.embeds.clone();
        self.entries.push_back(entry);
        Some(embeds)
    }

    fn insert(&mut self, key: u64, image: &Image, embeds: Tensor) {
        if self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            key,
            size: image.size,
            pixels: image.pixels.to_vec(),
            embeds,
        });
    }

    /// The images' query embeddings [B, Q, H], computing (with `compute`, on the distinct
    /// images not cached, in order) only those not cached.
    pub fn query_embeds(
        &mut self,
        images: &[Image],
        metrics: &Metrics,
        compute: impl FnOnce(&[Image]) -> Result<Tensor, String>,
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
            let distinct: Vec<Image> = misses.iter().map(|&m| images[m]).collect();
            let embeds = compute(&distinct)?;
            for (u, &m) in misses.iter().enumerate() {
                // An owned copy: a cached row must not keep the whole batch's tensor alive.
                let row = embeds
                    .narrow(0, u, 1)
                    .and_then(|r| r.copy())
                    .map_err(|e| e.to_string())?;
                self.insert(keys[m], &images[m], row.clone());
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

    const ONE: [f32; 12] = [1.0; 12];
    const TWO: [f32; 12] = [2.0; 12];
    const THREE: [f32; 12] = [3.0; 12];

    fn image(pixels: &[f32]) -> Image<'_> {
        Image {
            pixels,
            size: ImageSize::new(2, 2),
        }
    }

    /// `compute` stands for the vision tower: row i is filled with the image's first pixel.
    fn fake(images: &[Image], calls: &mut Vec<usize>) -> Result<Tensor, String> {
        calls.push(images.len());
        let data: Vec<f32> = images.iter().flat_map(|p| vec![p.pixels[0]; 4]).collect();
        Tensor::from_vec(data, (images.len(), 2, 2), &Device::Cpu).map_err(|e| e.to_string())
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
        let images = [image(&ONE), image(&TWO), image(&ONE)];
        let out = cache
            .query_embeds(&images, &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [1.0, 2.0, 1.0]);
        assert_eq!(calls, [2]);
        // Both recent: no compute at all.
        let out = cache
            .query_embeds(&[image(&TWO), image(&ONE)], &metrics, |p| {
                fake(p, &mut calls)
            })
            .unwrap();
        assert_eq!(firsts(&out), [2.0, 1.0]);
        assert_eq!(calls, [2]);
        // A third image evicts the least recently used (2.0).
        cache
            .query_embeds(&[image(&THREE)], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(cache.len(), 2);
        let out = cache
            .query_embeds(&[image(&TWO), image(&ONE)], &metrics, |p| {
                fake(p, &mut calls)
            })
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
        let a = image(&ONE);
        let out = cache
            .query_embeds(&[a], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [1.0]);
        // Forge an entry with a's key but other pixels: a lookup of a must not return it.
        cache.entries.clear();
        cache.insert(
            key(&a),
            &image(&[9.0; 12]),
            Tensor::zeros((1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let out = cache
            .query_embeds(&[a], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(firsts(&out), [1.0]);
        assert_eq!(calls, [1, 1]);
    }

    #[test]
    fn the_same_pixels_at_another_size_are_another_image() {
        // 12 values are [3, 2, 2] or [3, 1, 4]: the size is part of the key and the comparison.
        let metrics = Metrics::new().unwrap();
        let mut cache = FeatureCache::new(4);
        let mut calls = Vec::new();
        let square = image(&ONE);
        let wide = Image {
            pixels: &ONE,
            size: ImageSize::new(1, 4),
        };
        assert_ne!(key(&square), key(&wide));
        cache
            .query_embeds(&[square, wide], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(calls, [2]);
        cache.entries.retain(|e| e.size == square.size);
        cache.entries[0].key = key(&wide);
        cache
            .query_embeds(&[wide], &metrics, |p| fake(p, &mut calls))
            .unwrap();
        assert_eq!(
            calls,
            [2, 1],
            "an entry of another size with the same key is not a hit"
        );
    }
}
