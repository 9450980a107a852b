//! Decode-step attention (one query per row) for f32 CPU tensors. candle's matmul runs two small
//! matrix products per row and head (512 per layer at batch 8, each with gemm's setup); this
//! computes them directly, one task per row and head, reading the KV buffer views in place.
//! Masked keys get exactly zero weight, so a row's result does not depend on how far the batch
//! pads it. The reference is softmax(q k^T + mask) v in f32 (test below).

use candle_core::{DType, Device, Result, Tensor};

/// A decode step's attention (one query per row) for f32 CPU tensors: q [B, H, 1, hd] (scaled),
/// k and v [B, H, T, hd], the additive mask [B, 1, 1, T]. candle's matmul runs two small
/// matrix products per row and head (512 per layer at batch 8, each with gemm's setup); this
/// computes them directly, one task per row and head. Masked keys get exactly zero weight,
/// so a row's result does not depend on how far the batch pads it. `None` for other shapes.
pub fn attend_one_query(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let (b, h, s, hd) = q.dims4()?;
    let t = k.dim(2)?;
    let all_f32 = [q, k, v, mask]
        .iter()
        .all(|x| x.dtype() == DType::F32 && x.device().is_cpu());
    if s != 1 || !all_f32 || mask.dims() != [b, 1, 1, t] || v.dims() != k.dims() {
        return Ok(None);
    }
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let mask = mask.flatten_all()?.to_vec1::<f32>()?;
    // Views into a KV buffer ([B, H, capacity, hd], the first t positions) are read in place.
    let head_major = |x: &Tensor| {
        let st = x.layout().stride();
        st[3] == 1 && st[2] == hd && st[0] == h * st[1]
    };
    let k = if head_major(k) {
        k.clone()
    } else {
        k.contiguous()?
    };
    let v = if head_major(v) {
        v.clone()
    } else {
        v.contiguous()?
    };
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Ok(None);
    };
    // Where row-and-head `bh`'s t keys (values) start: `start + bh * step`.
    let (k_start, k_step) = (kl.start_offset(), kl.stride()[1]);
    let (v_start, v_step) = (vl.start_offset(), vl.stride()[1]);
    let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
    let mut out = vec![0f32; b * h * hd];
    out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| {
        let (qr, row_mask) = (
            &q[bh * hd..(bh + 1) * hd],
            &mask[(bh / h) * t..(bh / h + 1) * t],
        );
        let keys = &kd[k_start + bh * k_step..][..t * hd];
        let values = &vd[v_start + bh * v_step..][..t * hd];
        let mut scores: Vec<f32> = keys
            .chunks_exact(hd)
            .zip(row_mask)
            .map(|(kr, m)| dot(qr, kr) + m)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for (p, vr) in scores.iter().zip(values.chunks_exact(hd)) {
            let p = p / sum;
            if p != 0.0 {
                for (o, x) in o.iter_mut().zip(vr) {
                    *o += p * x;
                }
            }
        }
    });
    drop((ks, vs));
    Ok(Some(Tensor::from_vec(out, (b, h, 1, hd), &Device::Cpu)?))
}

/// A dot product in 8 interleaved partial sums (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q k^T + mask) v with candle's ops: the reference the kernel is held to.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        let scores = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs.matmul(v).unwrap()
    }

    #[test]
    fn agrees_with_softmax_attention_and_reads_buffer_views_in_place() {
        let dev = Device::Cpu;
        let (b, h, t, hd) = (3, 2, 9, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, 1, hd), &dev).unwrap();
        // A view of the first t positions of a larger buffer, as the KV caches hand it over.
        let buffer = Tensor::randn(0f32, 1.0, (b, h, t + 5, hd), &dev).unwrap();
        let k = buffer.narrow(2, 0, t).unwrap();
        let v = (buffer.narrow(2, 0, t).unwrap() * 0.5).unwrap();
        // Row 1 has two padded keys at the front.
        let mut mask = vec![0f32; b * t];
        mask[t] = f32::MIN;
        mask[t + 1] = f32::MIN;
        let mask = Tensor::from_vec(mask, (b, 1, 1, t), &dev).unwrap();
        let ours = attend_one_query(&q, &k, &v, &mask).unwrap().unwrap();
        let want = reference(&q, &k.contiguous().unwrap(), &v, &mask);
        let diff: f32 = (ours - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        // Other shapes are not served: the caller falls back.
        let two = Tensor::randn(0f32, 1.0, (b, h, 2, hd), &dev).unwrap();
        assert!(attend_one_query(&two, &k, &v, &mask).unwrap().is_none());
    }
}
