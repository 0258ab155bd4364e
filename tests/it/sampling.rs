//! Sampling: greedy is argmax, seeds reproduce, filters never sample outside their sets
//! (many draws with a fixed seed), and the repetition penalty follows Hugging Face.

use qwen2_edge::sampling::{apply_repetition_penalty, argmax, Sampler, SamplingParams};

const DRAWS: usize = 4000;

/// A fixed, varied distribution over 50 tokens: logits 0, 0.1, …, 4.9 in shuffled order.
fn logits() -> Vec<f32> {
    (0..50u32).map(|i| ((i * 37) % 50) as f32 * 0.1).collect()
}

fn params(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(1234),
        ..SamplingParams::greedy()
    }
}

fn draws(p: SamplingParams) -> Vec<u32> {
    let mut s = Sampler::new(p).unwrap();
    (0..DRAWS).map(|_| s.sample(&mut logits(), &[])).collect()
}

fn probs(l: &[f32]) -> Vec<f64> {
    let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = l.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

/// Token ids sorted by descending logit.
fn ranked() -> Vec<u32> {
    let l = logits();
    let mut ids: Vec<u32> = (0..l.len() as u32).collect();
    ids.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
    ids
}

#[test]
fn greedy_is_argmax() {
    let l = logits();
    let mut s = Sampler::new(params(0.0)).unwrap();
    for _ in 0..10 {
        assert_eq!(s.sample(&mut l.clone(), &[]), argmax(&l));
    }
    assert_eq!(argmax(&l), ranked()[0]);
}

#[test]
fn a_seed_reproduces() {
    let p = SamplingParams {
        top_k: 20,
        top_p: 0.9,
        ..params(0.8)
    };
    assert_eq!(draws(p.clone()), draws(p.clone()));
    let other = SamplingParams {
        seed: Some(4321),
        ..p.clone()
    };
    assert_ne!(draws(p), draws(other));
}

#[test]
fn plain_sampling_follows_the_distribution() {
    let got = draws(params(1.0));
    let want = probs(&logits());
    let top = ranked()[0];
    let freq = got.iter().filter(|&&t| t == top).count() as f64 / DRAWS as f64;
    // Binomial standard error at p≈0.08, n=4000 is ≈0.004; allow 4 of them.
    assert!(
        (freq - want[top as usize]).abs() < 0.02,
        "{freq} vs {}",
        want[top as usize]
    );
    // Temperature 1 over 50 tokens: many distinct tokens appear.
    let mut distinct = got.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 30);
}

#[test]
fn top_k_never_leaves_the_k_best() {
    let allowed = &ranked()[..5];
    let got = draws(SamplingParams {
        top_k: 5,
        ..params(1.5)
    });
    assert!(got.iter().all(|t| allowed.contains(t)));
    for t in allowed {
        assert!(got.contains(t), "token {t} of the top 5 never drawn");
    }
}

#[test]
fn top_p_never_leaves_the_nucleus() {
    let p = 0.5;
    let l = logits();
    let pr = probs(&l);
    let order = ranked();
    // The smallest head of the ranking whose mass reaches p.
    let mut mass = 0.0;
    let mut nucleus = Vec::new();
    for &t in &order {
        if mass >= p {
            break;
        }
        mass += pr[t as usize];
        nucleus.push(t);
    }
    let got = draws(SamplingParams {
        top_p: p as f32,
        ..params(1.0)
    });
    assert!(
        got.iter().all(|t| nucleus.contains(t)),
        "nucleus {nucleus:?}"
    );
    assert!(nucleus.iter().all(|t| got.contains(t)));
}

#[test]
fn min_p_never_samples_below_the_threshold() {
    let min_p = 0.3f64;
    let pr = probs(&logits());
    let top = pr.iter().cloned().fold(0.0, f64::max);
    let allowed: Vec<u32> = (0..pr.len() as u32)
        .filter(|&t| pr[t as usize] >= min_p * top)
        .collect();
    assert!(allowed.len() > 1 && allowed.len() < 50);
    let got = draws(SamplingParams {
        min_p: min_p as f32,
        ..params(1.0)
    });
    assert!(got.iter().all(|t| allowed.contains(t)));
}

#[test]
fn filters_combine_in_hf_order() {
    // top-k 10 then top-p 0.3 then min-p: always inside the top 10.
    let got = draws(SamplingParams {
        top_k: 10,
        top_p: 0.3,
        min_p: 0.05,
        ..params(0.7)
    });
    let allowed = &ranked()[..10];
    assert!(got.iter().all(|t| allowed.contains(t)));
}

#[test]
fn repetition_penalty_matches_hf_formula() {
    // HF: score = score * penalty if score < 0 else score / penalty, once per distinct id.
    let mut l = vec![1.5, -0.5, 0.0, 2.0, -3.0];
    apply_repetition_penalty(&mut l, &[0, 1, 1, 4, 0], 1.3, &mut Vec::new());
    let want = [1.5 / 1.3, -0.5 * 1.3, 0.0, 2.0, -3.0 * 1.3];
    for (a, b) in l.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{l:?}");
    }
    // The penalty turns greedy away from a repeated token.
    let mut s = Sampler::new(SamplingParams {
        repetition_penalty: 2.0,
        ..params(0.0)
    })
    .unwrap();
    assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1);
}

#[test]
fn invalid_values_are_rejected() {
    for bad in [
        params(-1.0),
        SamplingParams {
            top_p: 0.0,
            ..params(1.0)
        },
        SamplingParams {
            top_p: 1.01,
            ..params(1.0)
        },
        SamplingParams {
            min_p: -0.1,
            ..params(1.0)
        },
        SamplingParams {
            repetition_penalty: -1.0,
            ..params(1.0)
        },
    ] {
        let err = Sampler::new(bad).err().expect("must be rejected");
        assert!(err.to_string().contains("must be"), "{err}");
    }
}
