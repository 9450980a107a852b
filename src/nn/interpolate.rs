//! Resizing a grid of vectors as `torch.nn.functional.interpolate(mode="bicubic",
//! align_corners=False)` does (the CPU kernel's index and weight rules, in f32), for the vision
//! encoder's position embeddings at other image sizes (`interpolate_pos_encoding=True`).
//! Plain slices in and out; knows nothing of models.

/// torch's cubic convolution constant.
const A: f32 = -0.75;

fn cubic1(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic2(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// For each output index along one axis: the four source indices (clamped to the edge) and their
/// weights. torch: scale = in / out; source = scale * (dst + 0.5) - 0.5, not clamped below for
/// cubic; index = min(floor(source), in - 1); t = clamp(source - index, 0, 1).
fn taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = input as f32 / output as f32;
    let last = input as i64 - 1;
    (0..output)
        .map(|dst| {
            let real = scale * (dst as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(last);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let weights = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            let at = |k: i64| (index + k - 1).clamp(0, last) as usize;
            ([at(0), at(1), at(2), at(3)], weights)
        })
        .collect()
}

/// `src` holds an `in_h` x `in_w` grid of `dim`-vectors, row-major ([in_h, in_w, dim]); returns
/// the `out_h` x `out_w` grid the same way. Each output is
/// sum_i wy_i * (sum_j wx_j * src[y_i][x_j]), accumulated in that order.
pub fn bicubic_grid(
    src: &[f32],
    (in_h, in_w): (usize, usize),
    dim: usize,
    (out_h, out_w): (usize, usize),
) -> Vec<f32> {
    assert_eq!(src.len(), in_h * in_w * dim, "grid size");
    let (ys, xs) = (taps(in_h, out_h), taps(in_w, out_w));
    let mut out = vec![0f32; out_h * out_w * dim];
    let mut row = vec![0f32; dim];
    for (oy, (yi, wy)) in ys.iter().enumerate() {
        for (ox, (xi, wx)) in xs.iter().enumerate() {
            let o = &mut out[(oy * out_w + ox) * dim..][..dim];
            for i in 0..4 {
                let line = &src[yi[i] * in_w * dim..][..in_w * dim];
                for (c, r) in row.iter_mut().enumerate() {
                    let mut acc = line[xi[0] * dim + c] * wx[0];
                    for j in 1..4 {
                        acc += line[xi[j] * dim + c] * wx[j];
                    }
                    *r = acc;
                }
                for (v, r) in o.iter_mut().zip(&row) {
                    if i == 0 {
                        *v = r * wy[0];
                    } else {
                        *v += r * wy[i];
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_size_is_the_identity() {
        let src: Vec<f32> = (0..4 * 3 * 2).map(|i| (i as f32).sin()).collect();
        assert_eq!(bicubic_grid(&src, (4, 3), 2, (4, 3)), src);
    }

    #[test]
    fn weights_sum_to_one_so_a_constant_grid_stays_constant() {
        for (input, output) in [(4, 7), (4, 3), (16, 37), (16, 5)] {
            for (_, w) in taps(input, output) {
                assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{w:?}");
            }
        }
        let src = vec![2.5f32; 4 * 4 * 3];
        for v in bicubic_grid(&src, (4, 4), 3, (7, 3)) {
            assert!((v - 2.5).abs() < 1e-5, "{v}");
        }
    }

    #[test]
    fn doubling_follows_torch_source_indices() {
        // scale 0.5: output 0 reads source -0.25 (index -1 clamped, t = 0.75), output 1 reads
        // 0.25 (index 0, t = 0.25).
        let t = taps(4, 8);
        assert_eq!(t[0].0, [0, 0, 0, 1]);
        assert_eq!(t[1].0, [0, 0, 1, 2]);
        assert_eq!(t[7].0, [2, 3, 3, 3]);
        assert_eq!(
            t[0].1,
            [cubic2(1.75), cubic1(0.75), cubic1(0.25), cubic2(1.25)]
        );
    }

    #[test]
    fn each_axis_is_independent_of_the_vector_position() {
        // A grid whose vectors are (f(y, x), 2 f(y, x)): the two channels stay proportional.
        let src: Vec<f32> = (0..16)
            .flat_map(|k| {
                let v = ((k * 7 % 5) as f32) - 1.5;
                [v, 2.0 * v]
            })
            .collect();
        let out = bicubic_grid(&src, (4, 4), 2, (3, 5));
        for pair in out.chunks_exact(2) {
            assert!((pair[1] - 2.0 * pair[0]).abs() < 1e-5, "{pair:?}");
        }
    }
}
