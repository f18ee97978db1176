//! Sampling from the tiny LLaMA, alone in its test binary: it reseeds tch's process-wide
//! generator and checks that one seed gives one text, which a test drawing from that
//! generator on a parallel thread would break (the invariant tests all draw from it).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod tiny_llama;

use hawada::model::Family;
use tiny_llama::model;

#[test]
fn sampled_continuations_keep_their_prompts_follow_the_seed_and_sharpen_to_greedy() {
    let model = model(8);
    let prompts = model.random_input(4, 3);
    let sample = |seed: i64, temperature: f64| {
        tch::manual_seed(seed);
        model
            .sample_continuations(&prompts, 6, temperature)
            .unwrap()
    };
    let a = sample(1, 1.0);
    assert_eq!(a.size(), vec![4, 9]);
    assert!(a.narrow(1, 0, 3).equal(&prompts));
    assert!(a.min().int64_value(&[]) >= 0 && a.max().int64_value(&[]) < 64);
    assert!(a.equal(&sample(1, 1.0)), "same seed, same text");
    // Sampling at temperature 1 over 64 ids draws other tokens than the argmax; at a
    // temperature near 0 it is the argmax.
    let greedy = model.continue_tokens(&prompts, 6, 0.0, None);
    assert!(!a.equal(&greedy));
    assert!(sample(2, 1e-4).equal(&greedy));
}
