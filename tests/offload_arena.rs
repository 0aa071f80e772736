//! The resident arena never goes over budget, whatever sequence of reserve/resize/release it
//! is given, and says clearly what it refused.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sirius_offload::offload::arena::{ArenaSummary, ResidentArena};
use sirius_offload::units::format_bytes;
use sirius_offload::Error;

/// A model of what the arena should hold, kept beside it.
#[derive(Default)]
struct Model {
    items: Vec<(String, u64)>,
    peak: u64,
}

impl Model {
    fn used(&self) -> u64 {
        self.items.iter().map(|(_, b)| b).sum()
    }
}

fn random_bytes(rng: &mut StdRng, budget: u64) -> u64 {
    // Mostly sizes around the budget's scale, sometimes zero or far too big.
    match rng.gen_range(0..10) {
        0 => 0,
        1 => rng.gen_range(budget..=budget.saturating_mul(3).max(budget.saturating_add(1))),
        _ => rng.gen_range(0..=budget / 3 + 1),
    }
}

#[test]
fn random_sequences_never_exceed_the_budget() {
    for seed in 0..200u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let budget = match seed % 4 {
            0 => rng.gen_range(0..100),
            1 => rng.gen_range(1..1 << 20),
            2 => rng.gen_range(1 << 30..1 << 40),
            _ => u64::MAX - rng.gen_range(0..1000),
        };
        let mut arena = ResidentArena::new(budget);
        let mut model = Model::default();
        for step in 0..300 {
            let before = arena.items();
            let before_used = arena.used();
            match rng.gen_range(0..3) {
                0 => {
                    let label = format!("t{}", rng.gen_range(0..40));
                    let bytes = random_bytes(&mut rng, budget);
                    let exists = model.items.iter().any(|(l, _)| *l == label);
                    let fits = model.used().checked_add(bytes).is_some_and(|t| t <= budget);
                    match arena.reserve(label.clone(), bytes) {
                        Ok(()) => {
                            assert!(!exists && fits, "seed {seed} step {step}: accepted {label}");
                            model.items.push((label, bytes));
                        }
                        Err(Error::InvalidArgument(msg)) => {
                            assert!(exists, "seed {seed} step {step}: {msg}");
                            assert!(msg.contains(&label));
                            assert_eq!(arena.items(), before);
                        }
                        Err(Error::ArenaFull {
                            label: l,
                            requested,
                            used,
                            budget: b,
                        }) => {
                            assert!(!exists && !fits, "seed {seed} step {step}: refused {label}");
                            assert_eq!(
                                (l.as_str(), requested, used, b),
                                (label.as_str(), bytes, before_used, budget)
                            );
                            assert_eq!(arena.items(), before, "refusal changed the arena");
                            assert_eq!(arena.used(), before_used);
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                1 if !model.items.is_empty() => {
                    let i = rng.gen_range(0..model.items.len());
                    let label = model.items[i].0.clone();
                    let bytes = random_bytes(&mut rng, budget);
                    let others = model.used() - model.items[i].1;
                    let fits = others.checked_add(bytes).is_some_and(|t| t <= budget);
                    match arena.resize(&label, bytes) {
                        Ok(()) => {
                            assert!(fits);
                            model.items[i].1 = bytes;
                        }
                        Err(Error::ArenaFull {
                            requested, used, ..
                        }) => {
                            assert!(!fits);
                            assert_eq!((requested, used), (bytes, others));
                            assert_eq!(arena.items(), before, "refused resize changed the arena");
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                _ => {
                    let label = format!("t{}", rng.gen_range(0..40));
                    match model.items.iter().position(|(l, _)| *l == label) {
                        Some(i) => {
                            let (_, bytes) = model.items.remove(i);
                            assert_eq!(arena.release(&label).ok(), Some(bytes));
                        }
                        None => assert!(arena.release(&label).is_err()),
                    }
                }
            }
            model.peak = model.peak.max(model.used());
            assert!(arena.used() <= arena.budget());
            assert_eq!(arena.used(), model.used());
            assert_eq!(arena.free(), budget - model.used());
            assert_eq!(arena.items(), model.items, "reservation order kept");
            assert_eq!(arena.peak(), model.peak);
        }
    }
}

#[test]
fn refusal_names_label_and_sizes() {
    let mut arena = ResidentArena::new(10 << 20);
    arena.reserve("kv cache", 6 << 20).unwrap();
    let err = arena.reserve("layer 7 sparse ffn", 5 << 20).unwrap_err();
    let msg = err.to_string();
    for part in [
        "layer 7 sparse ffn",
        &format_bytes(5 << 20),
        &format_bytes(6 << 20),
        &format_bytes(10 << 20),
    ] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    assert_eq!(arena.used(), 6 << 20);

    let err = arena.resize("kv cache", 11 << 20).unwrap_err().to_string();
    assert!(
        err.contains("kv cache") && err.contains(&format_bytes(11 << 20)),
        "{err}"
    );
    assert!(arena
        .resize("nope", 1)
        .unwrap_err()
        .to_string()
        .contains("nope"));
    assert!(arena
        .reserve("kv cache", 1)
        .unwrap_err()
        .to_string()
        .contains("kv cache"));
}

#[test]
fn overflow_cannot_slip_under_the_budget() {
    let mut arena = ResidentArena::new(u64::MAX);
    arena.reserve("a", u64::MAX - 1).unwrap();
    assert!(matches!(
        arena.reserve("b", 2),
        Err(Error::ArenaFull { .. })
    ));
    assert!(matches!(
        arena.reserve("c", u64::MAX),
        Err(Error::ArenaFull { .. })
    ));
    arena.reserve("d", 1).unwrap();
    assert_eq!(arena.free(), 0);
}

#[test]
fn summary_serializes_budget_used_peak() {
    let mut arena = ResidentArena::new(100);
    arena.reserve("a", 70).unwrap();
    arena.resize("a", 30).unwrap();
    assert_eq!(arena.get("a"), Some(30));
    let s = arena.summary();
    assert_eq!(
        s,
        ArenaSummary {
            budget: 100,
            used: 30,
            peak: 70
        }
    );
    let v = serde_json::to_value(s).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"budget": 100, "used": 30, "peak": 70})
    );
}
