//! Key/value state helpers shared by the language models: a self-attention cache that grows in
//! place, padded concatenation of two batches' caches and masks, and the row-gather shortcut.
//!
//! The cache grows in place. Concatenating each step's key and value
//! onto the cache copies the whole cache every step, a cost that grows with the sequence (at
//! batch 8 and 500 positions, 2.6 GB a step for OPT-2.7b, a quarter of its weights). Here the
//! keys and values live in buffers with spare positions: a step writes its position in place,
//! and only a full buffer is copied, into one half as large again.

use candle_core::{Result, Tensor};

/// Positions added beyond what is needed when a buffer is (re)allocated: at least this many,
/// or half the current length.
const MIN_SPARE: usize = 64;

/// One layer's keys and values, `[B, H, T, hd]` each, stored in `[B, H, capacity, hd]` buffers
/// of which the first `len` positions are filled. Not `Clone`: two owners would write into the
/// same buffers.
#[derive(Debug)]
pub struct KvBuffer {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvBuffer {
    /// A buffer holding `k` and `v` (`[B, H, T, hd]`), with room to grow.
    pub fn new(k: &Tensor, v: &Tensor) -> Result<Self> {
        let len = k.dim(2)?;
        let mut buffer = Self {
            k: spare(k, len)?,
            v: spare(v, len)?,
            len: 0,
        };
        buffer.k.slice_set(&k.contiguous()?, 2, 0)?;
        buffer.v.slice_set(&v.contiguous()?, 2, 0)?;
        buffer.len = len;
        Ok(buffer)
    }

    /// Adds a step's keys and values (`[B, H, S, hd]`) to a layer's cache, starting one if
    /// there is none, and returns all of them (`[B, H, T, hd]`) to attend over.
    pub fn push(slot: &mut Option<KvBuffer>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        match slot {
            Some(buffer) => {
                buffer.append(&k, &v)?;
                Ok((buffer.keys()?, buffer.values()?))
            }
            None => {
                *slot = Some(Self::new(&k, &v)?);
                Ok((k, v))
            }
        }
    }

    /// Number of filled positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batch rows.
    pub fn rows(&self) -> Result<usize> {
        self.k.dim(0)
    }

    /// Appends `k` and `v` (`[B, H, S, hd]`) after the filled positions.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let s = k.dim(2)?;
        if self.len + s > self.k.dim(2)? {
            let (old_k, old_v) = (self.keys()?, self.values()?);
            let len = self.len + s;
            self.k = spare(&old_k, len)?;
            self.v = spare(&old_v, len)?;
            self.k.slice_set(&old_k.contiguous()?, 2, 0)?;
            self.v.slice_set(&old_v.contiguous()?, 2, 0)?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += s;
        Ok(())
    }

    /// The filled keys, `[B, H, len, hd]` (a view into the buffer).
    pub fn keys(&self) -> Result<Tensor> {
        self.k.narrow(2, 0, self.len)
    }

    /// The filled values, `[B, H, len, hd]` (a view into the buffer).
    pub fn values(&self) -> Result<Tensor> {
        self.v.narrow(2, 0, self.len)
    }

    /// Keeps the batch rows `idx` (u32 indices), in that order.
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        self.k = self.k.index_select(idx, 0)?;
        self.v = self.v.index_select(idx, 0)?;
        Ok(())
    }

    /// `self`'s rows then `other`'s, the shorter cache zero-padded on the left (`left`) or the
    /// right along the positions.
    pub fn merge(self, other: KvBuffer, left: bool) -> Result<Self> {
        let k = cat_padded(&self.keys()?, &other.keys()?, 2, left)?;
        let v = cat_padded(&self.values()?, &other.values()?, 2, left)?;
        Self::new(&k, &v)
    }
}

/// `rows` is `0..batch`: a gather that would change nothing.
pub fn is_identity(rows: &[usize], batch: usize) -> bool {
    rows.len() == batch && rows.iter().enumerate().all(|(i, &r)| i == r)
}

/// Concatenates `a` and `b` along dim 0 after zero-padding the shorter one along `dim` to the
/// longer's length, at the front (`front`) or the back.
pub fn cat_padded(a: &Tensor, b: &Tensor, dim: usize, front: bool) -> candle_core::Result<Tensor> {
    let len = a.dim(dim)?.max(b.dim(dim)?);
    let pad = |t: &Tensor| -> candle_core::Result<Tensor> {
        let missing = len - t.dim(dim)?;
        if missing == 0 {
            return Ok(t.clone());
        }
        let mut shape = t.dims().to_vec();
        shape[dim] = missing;
        let zeros = Tensor::zeros(shape, t.dtype(), t.device())?;
        if front {
            Tensor::cat(&[&zeros, t], dim)
        } else {
            Tensor::cat(&[t, &zeros], dim)
        }
    };
    Tensor::cat(&[&pad(a)?, &pad(b)?], 0)
}

/// Row masks of two batches padded with 0 to a common length (at the front or the back), `a`'s
/// rows first.
pub fn merge_masks(a: &[Vec<u8>], b: &[Vec<u8>], front: bool) -> Vec<Vec<u8>> {
    let len = a.iter().chain(b).map(Vec::len).max().unwrap_or(0);
    a.iter()
        .chain(b)
        .map(|m| {
            let pad = std::iter::repeat_n(0u8, len - m.len());
            if front {
                pad.chain(m.iter().copied()).collect()
            } else {
                m.iter().copied().chain(pad).collect()
            }
        })
        .collect()
}

/// A zeroed `[B, H, capacity, hd]` buffer shaped like `t` with room for `len` positions and
/// spare ones.
fn spare(t: &Tensor, len: usize) -> Result<Tensor> {
    let (b, h, _, hd) = t.dims4()?;
    let capacity = len + MIN_SPARE.max(len / 2);
    Tensor::zeros((b, h, capacity, hd), t.dtype(), t.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn appends_select_and_merge_equal_concatenation() {
        let dev = Device::Cpu;
        let first = Tensor::randn(0f32, 1.0, (3, 2, 5, 4), &dev).unwrap();
        let mut buffer = KvBuffer::new(&first, &(&first * 2.0).unwrap()).unwrap();
        let mut expected = first.clone();
        // Past the first capacity (5 + 64), so the buffer is reallocated on the way.
        for _ in 0..100 {
            let step = Tensor::randn(0f32, 1.0, (3, 2, 1, 4), &dev).unwrap();
            buffer.append(&step, &(&step * 2.0).unwrap()).unwrap();
            expected = Tensor::cat(&[&expected, &step], 2).unwrap();
        }
        let same = |a: &Tensor, b: &Tensor| {
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b);
        };
        assert_eq!(buffer.len(), 105);
        same(&buffer.keys().unwrap(), &expected);
        same(&buffer.values().unwrap(), &(&expected * 2.0).unwrap());

        let idx = Tensor::new(&[2u32, 0], &dev).unwrap();
        buffer.select_rows(&idx).unwrap();
        let expected = expected.index_select(&idx, 0).unwrap();
        same(&buffer.keys().unwrap(), &expected);

        let short = Tensor::randn(0f32, 1.0, (1, 2, 7, 4), &dev).unwrap();
        let merged = buffer
            .merge(KvBuffer::new(&short, &short).unwrap(), true)
            .unwrap();
        let padded = Tensor::cat(
            &[
                &Tensor::zeros((1, 2, 105 - 7, 4), candle_core::DType::F32, &dev).unwrap(),
                &short,
            ],
            2,
        )
        .unwrap();
        same(
            &merged.keys().unwrap(),
            &Tensor::cat(&[&expected, &padded], 0).unwrap(),
        );
        assert_eq!(merged.rows().unwrap(), 3);
    }
}
