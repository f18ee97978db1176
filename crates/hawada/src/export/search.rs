//! The GPU-friendly export search (DESIGN §6): round each group's kept count to multiples of the
//! unit kind's friendly sizes (channels 1, 8, 16, …, 128; heads 1, 2, 4; KV groups 1), floor
//! and ceil, keep the top units by logit, deduplicate, then *measure* and score every candidate
//! it lists. The Pareto front of (latency, agreement) is kept; the pick is the best agreement
//! whose measured latency meets the target, else the fastest.

use crate::error::Result;
use crate::gates::{enforce_follows, floor_units, keep_from_logits, top_units};
use crate::latency::measure::LatencyStats;
use crate::model::{Group, KeepSet, UnitKind};
use crate::progress::Observer;

/// Rounding multiples per unit kind: channels in elements, heads and KV groups in units.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchOptions {
    #[serde(default = "default_channel_multiples")]
    pub channel_multiples: Vec<i64>,
    #[serde(default = "default_head_multiples")]
    pub head_multiples: Vec<i64>,
}

fn default_channel_multiples() -> Vec<i64> {
    // 256 too: a gate of 64 or 128 FFN units (SmolLM2's recipes) is rounded by nothing smaller.
    vec![1, 8, 16, 32, 64, 128, 256]
}
fn default_head_multiples() -> Vec<i64> {
    vec![1, 2, 4]
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            channel_multiples: default_channel_multiples(),
            head_multiples: default_head_multiples(),
        }
    }
}

/// Units per rounding step for a group, or `None` when the multiple does not apply to it (a
/// channel multiple never rounds heads, nor a head multiple channels).
fn step_units(group: &Group, multiple: i64, options: &SearchOptions) -> Option<i64> {
    match group.kind {
        UnitKind::Channels => (options.channel_multiples.contains(&multiple)
            && multiple > group.unit_width
            && multiple % group.unit_width == 0)
            .then(|| multiple / group.unit_width),
        UnitKind::Heads => {
            (options.head_multiples.contains(&multiple) && multiple > 1).then_some(multiple)
        }
        UnitKind::KvGroups | UnitKind::Sublayer => None,
    }
}

/// The keep-set that keeps units above one logit threshold across all groups (`min_keep` and
/// `follows` as in [`keep_from_logits`]), with the lowest threshold whose `predicted_ms` meets
/// `target_ms`, or the highest threshold when none does.
///
/// Gate training ends with the target met at the `l > 0` threshold, but the gates fall together
/// (Adam moves every logit about `lr` a step when the latency term dominates), so that threshold
/// can land far past the target (measured: a 0.4× target exported at 0.1×). The logits' order
/// still ranks the units; this moves only the cut.
pub fn keep_meeting_target(
    groups: &[Group],
    logits: &[Vec<f32>],
    min_keep: i64,
    target_ms: f64,
    predicted_ms: &dyn Fn(&KeepSet) -> f64,
) -> KeepSet {
    let mut thresholds: Vec<f32> = logits.iter().flatten().copied().collect();
    thresholds.sort_by(f32::total_cmp);
    thresholds.dedup();
    // Cut `i` keeps the units above `thresholds[i - 1]`; cut 0 keeps every unit.
    let keep_at_cut = |i: usize| {
        let threshold = if i == 0 {
            f32::NEG_INFINITY
        } else {
            thresholds[i - 1]
        };
        let shifted: Vec<Vec<f32>> = logits
            .iter()
            .map(|values| values.iter().map(|&l| l - threshold).collect())
            .collect();
        keep_from_logits(groups, &shifted, min_keep)
    };
    let meets = |i: usize| predicted_ms(&keep_at_cut(i)) <= target_ms;
    let (mut over, mut under) = (0, thresholds.len());
    if meets(over) {
        return keep_at_cut(over);
    }
    if !meets(under) {
        return keep_at_cut(under);
    }
    // Latency falls as the cut rises (up to the tables' small steps): bisect for the first cut
    // that meets the target.
    while under - over > 1 {
        let mid = (over + under) / 2;
        if meets(mid) {
            under = mid;
        } else {
            over = mid;
        }
    }
    keep_at_cut(under)
}

/// Cuts at the target ([`keep_meeting_target`]), each measured: while a cut's measured latency
/// misses the target, the goal the proxy aims at shrinks by target / measured and the next cut
/// is taken, up to `attempts` cuts. The proxy's error near the target is what this corrects
/// (measured on an H100: the Llama-3.2-1B decode table proxy, MAPE 20 %, put the cut for
/// 1.125 ms at 1.281 ms). Returns the distinct cuts in order; the last is the first to meet the
/// target, when one does.
pub fn cuts_meeting_target(
    groups: &[Group],
    logits: &[Vec<f32>],
    min_keep: i64,
    target_ms: f64,
    predicted_ms: &dyn Fn(&KeepSet) -> f64,
    measured_ms: &mut dyn FnMut(&KeepSet) -> Result<f64>,
    attempts: usize,
) -> Result<Vec<(String, KeepSet)>> {
    let mut cuts: Vec<(String, KeepSet)> = Vec::new();
    let mut goal_ms = target_ms;
    for attempt in 1..=attempts {
        let cut = keep_meeting_target(groups, logits, min_keep, goal_ms, predicted_ms);
        if cuts.iter().any(|(_, kept)| *kept == cut) {
            break;
        }
        let ms = measured_ms(&cut)?;
        let name = match attempt {
            1 => "at target".to_string(),
            _ => format!("at target {attempt}"),
        };
        cuts.push((name, cut));
        if ms <= target_ms {
            break;
        }
        goal_ms *= target_ms / ms;
    }
    Ok(cuts)
}

/// Named candidate keep-sets: each base keep-set (the first is the trained one), then every
/// (multiple, floor|ceil) rounding of each base's counts with the `follows` rule re-applied,
/// deduplicated (first name wins). Roundings of a later base carry its name as a prefix.
pub fn candidates(
    groups: &[Group],
    logits: &[Vec<f32>],
    bases: &[(String, KeepSet)],
    min_keep: i64,
    options: &SearchOptions,
) -> Vec<(String, KeepSet)> {
    let mut out: Vec<(String, KeepSet)> = Vec::new();
    let mut add = |name: String, keep: KeepSet| {
        if !out.iter().any(|(_, k)| *k == keep) {
            out.push((name, keep));
        }
    };
    for (name, keep) in bases {
        add(name.clone(), keep.clone());
    }
    let multiples: Vec<i64> = options
        .channel_multiples
        .iter()
        .chain(&options.head_multiples)
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for (base_index, (base_name, base)) in bases.iter().enumerate() {
        let prefix = if base_index == 0 {
            String::new()
        } else {
            format!("{base_name} ")
        };
        for &multiple in &multiples {
            for ceil in [false, true] {
                let mut changed = false;
                let rounded = KeepSet(
                    groups
                        .iter()
                        .zip(logits)
                        .zip(&base.0)
                        .map(|((group, logits), kept)| {
                            let Some(step) = step_units(group, multiple, options) else {
                                return kept.clone();
                            };
                            let k = kept.len() as i64;
                            let rounded = if ceil {
                                k.div_euclid(step) * step + if k % step == 0 { 0 } else { step }
                            } else {
                                k.div_euclid(step) * step
                            };
                            let units = rounded
                                .max(step.min(group.len))
                                .max(floor_units(group, min_keep))
                                .min(group.len);
                            changed = true;
                            top_units(logits, units as usize, |_| true)
                        })
                        .collect(),
                );
                if changed {
                    add(
                        format!(
                            "{prefix}×{multiple} {}",
                            if ceil { "ceil" } else { "floor" }
                        ),
                        enforce_follows(groups, logits, rounded),
                    );
                }
            }
        }
    }
    // Around the last base (the cut at the target, or the trained keep-set): one unit more and
    // one fewer of each unit kind, so that a search whose roundings coincide (gates as wide as
    // every multiple) still measures the shapes next to the cut.
    if let Some((base_name, base)) = bases.last() {
        let prefix = if bases.len() == 1 {
            String::new()
        } else {
            format!("{base_name} ")
        };
        for (name, keep) in neighbours(groups, logits, base, min_keep) {
            add(format!("{prefix}{name}"), keep);
        }
    }
    out
}

/// `keep` with one unit more, and one fewer, in every group of each unit kind (for sublayers:
/// the dropped one with the highest logit back, the kept one with the lowest dropped), within
/// `min_keep` and the group lengths, the `follows` rule re-applied.
fn neighbours(
    groups: &[Group],
    logits: &[Vec<f32>],
    keep: &KeepSet,
    min_keep: i64,
) -> Vec<(String, KeepSet)> {
    let kinds = [
        (UnitKind::Channels, "channels"),
        (UnitKind::Heads, "heads"),
        (UnitKind::KvGroups, "kv groups"),
        (UnitKind::Sublayer, "sublayers"),
    ];
    let mut out = Vec::new();
    for (kind, label) in kinds {
        for more in [false, true] {
            let stepped = if kind == UnitKind::Sublayer {
                step_one_sublayer(groups, logits, keep, more)
            } else {
                step_each_group(groups, logits, keep, kind, more, min_keep)
            };
            if let Some(stepped) = stepped {
                let sign = if more { "+1" } else { "−1" };
                out.push((
                    format!("{label} {sign}"),
                    enforce_follows(groups, logits, stepped),
                ));
            }
        }
    }
    out
}

/// Every group of `kind` one unit wider (`more`) or narrower, top units by logit; `None` when no
/// group of that kind can move.
fn step_each_group(
    groups: &[Group],
    logits: &[Vec<f32>],
    keep: &KeepSet,
    kind: UnitKind,
    more: bool,
    min_keep: i64,
) -> Option<KeepSet> {
    let mut changed = false;
    let stepped = groups
        .iter()
        .zip(logits)
        .zip(&keep.0)
        .map(|((group, logits), kept)| {
            let k = kept.len() as i64;
            let target = if more { k + 1 } else { k - 1 };
            if group.kind != kind || target < floor_units(group, min_keep) || target > group.len {
                return kept.clone();
            }
            changed = true;
            top_units(logits, target as usize, |_| true)
        })
        .collect();
    changed.then_some(KeepSet(stepped))
}

/// One sublayer back (`more`: the dropped one with the highest logit) or one more dropped (the
/// kept one with the lowest logit); `None` when there is none to move.
fn step_one_sublayer(
    groups: &[Group],
    logits: &[Vec<f32>],
    keep: &KeepSet,
    more: bool,
) -> Option<KeepSet> {
    let logit = |g: usize| logits[g].first().copied().unwrap_or(0.0);
    let movable = (0..groups.len())
        .filter(|&g| groups[g].kind == UnitKind::Sublayer && keep.0[g].is_empty() == more);
    let chosen = if more {
        movable.max_by(|&a, &b| logit(a).total_cmp(&logit(b)))
    } else {
        movable.min_by(|&a, &b| logit(a).total_cmp(&logit(b)))
    }?;
    let mut stepped = keep.clone();
    stepped.0[chosen] = if more { vec![0] } else { Vec::new() };
    Some(stepped)
}

/// Fewer measured candidates than this and the search hardly searched: said in the record.
pub const FEW_CANDIDATES: usize = 4;

/// Why a search measured fewer than [`FEW_CANDIDATES`] candidates, for the record and the user.
pub fn few_candidates_warning(measured: usize) -> Option<String> {
    (measured < FEW_CANDIDATES).then(|| {
        format!(
            "the export search measured only {measured} candidate(s): the roundings of the gates' cut and its neighbours coincide (every group already at a multiple, at min_keep or at full width); widen export.channel_multiples / head_multiples or lower min_keep to search more shapes"
        )
    })
}

/// One measured candidate architecture of the export.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub name: String,
    pub latency_ms: LatencyStats,
    pub params: i64,
    /// Agreement with the teacher on the calibration batch, percent.
    pub agreement: f64,
    pub widths: Vec<i64>,
    /// Measured mean latency at or under the target.
    pub meets_target: bool,
    /// On the Pareto front of (latency, agreement).
    pub pareto: bool,
    /// The exported architecture.
    pub picked: bool,
}

/// A measured candidate before scoring.
pub struct Measurement {
    pub latency: LatencyStats,
    pub params: i64,
}

/// What the search needs from its caller: how to measure and score a keep-set.
pub struct SearchContext<'a> {
    pub measure: &'a mut dyn FnMut(&KeepSet) -> Result<Measurement>,
    /// Agreement with the teacher in percent on the calibration batch, hard masks.
    pub score: &'a mut dyn FnMut(&KeepSet) -> f64,
    pub observer: &'a dyn Observer,
}

/// Measures and scores every candidate; returns them all (Pareto and pick flags set) and the
/// index of the pick.
pub fn search(
    groups: &[Group],
    candidates: Vec<(String, KeepSet)>,
    target_ms: f64,
    ctx: SearchContext<'_>,
) -> Result<(Vec<Candidate>, Vec<KeepSet>, usize)> {
    ctx.observer.begin("search", candidates.len() as u64);
    let mut entries = Vec::with_capacity(candidates.len());
    let mut keeps = Vec::with_capacity(candidates.len());
    for (i, (name, keep)) in candidates.into_iter().enumerate() {
        let measured = (ctx.measure)(&keep)?;
        let agreement = (ctx.score)(&keep);
        let widths = groups
            .iter()
            .zip(&keep.0)
            .map(|(g, k)| k.len() as i64 * g.unit_width)
            .collect();
        tracing::info!(candidate = %name, mean_ms = measured.latency.mean, p95_ms = measured.latency.p95, params = measured.params, agreement, "search candidate");
        ctx.observer.advance(
            i as u64 + 1,
            &format!("{name}: {:.3} ms, {agreement:.1}%", measured.latency.mean),
        );
        entries.push(Candidate {
            name,
            latency_ms: measured.latency,
            params: measured.params,
            agreement,
            widths,
            meets_target: measured.latency.mean <= target_ms,
            pareto: false,
            picked: false,
        });
        keeps.push(keep);
    }
    ctx.observer.end();
    for i in 0..entries.len() {
        let (ms, agreement) = (entries[i].latency_ms.mean, entries[i].agreement);
        entries[i].pareto = !entries.iter().any(|o| {
            o.latency_ms.mean <= ms
                && o.agreement >= agreement
                && (o.latency_ms.mean < ms || o.agreement > agreement)
        });
    }
    let pick = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.meets_target)
        .max_by(|(_, a), (_, b)| {
            a.agreement
                .total_cmp(&b.agreement)
                .then(b.latency_ms.mean.total_cmp(&a.latency_ms.mean))
        })
        .or_else(|| {
            entries
                .iter()
                .enumerate()
                .min_by(|(_, a), (_, b)| a.latency_ms.mean.total_cmp(&b.latency_ms.mean))
        })
        .map(|(i, _)| i)
        .unwrap_or(0);
    if let Some(entry) = entries.get_mut(pick) {
        entry.picked = true;
    }
    Ok((entries, keeps, pick))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(name: &str, len: i64, unit_width: i64) -> Group {
        Group {
            name: name.into(),
            kind: UnitKind::Channels,
            len,
            unit_width,
            members: vec![],
            follows: None,
        }
    }

    /// The candidates of the trained keep-set alone, min_keep 1.
    fn candidates_of_trained(
        groups: &[Group],
        logits: &[Vec<f32>],
        trained: KeepSet,
        options: &SearchOptions,
    ) -> Vec<(String, KeepSet)> {
        candidates(
            groups,
            logits,
            &[("as trained".to_string(), trained)],
            1,
            options,
        )
    }

    /// The kept units per group of the candidate called `name`.
    fn keep_named(listed: &[(String, KeepSet)], name: &str) -> Option<Vec<Vec<i64>>> {
        listed
            .iter()
            .find(|(listed_name, _)| listed_name == name)
            .map(|(_, keep)| keep.0.clone())
    }

    #[test]
    fn rounds_floor_and_ceil_to_multiples_and_keeps_top_logits() {
        let groups = [channels("a", 8, 4)];
        let logits = vec![vec![5.0, -1.0, 4.0, 3.0, 2.0, -2.0, 1.0, 0.5]];
        // 5 units of 4 channels = 20 channels kept.
        let trained = KeepSet(vec![vec![0, 2, 3, 4, 6]]);
        let options = SearchOptions {
            channel_multiples: vec![1, 8, 16],
            head_multiples: vec![],
        };
        let c = candidates_of_trained(&groups, &logits, trained, &options);
        // 16 and 24 channels.
        assert_eq!(keep_named(&c, "×8 floor"), Some(vec![vec![0, 2, 3, 4]]));
        assert_eq!(
            keep_named(&c, "×8 ceil"),
            Some(vec![vec![0, 2, 3, 4, 6, 7]])
        );
        // ×16 floor keeps 16 channels, a duplicate of ×8 floor: listed once.
        let names: Vec<&str> = c.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names[..4],
            ["as trained", "×8 floor", "×8 ceil", "×16 ceil"]
        );
        // The neighbours of the cut, one unit either way (4 and 6 units), are ×8 floor and ceil
        // already: not listed again.
        assert_eq!(names.len(), 4);
    }

    #[test]
    fn the_search_lists_one_unit_more_and_fewer_of_each_kind_around_the_cut() {
        let heads = Group {
            kind: UnitKind::Heads,
            ..channels("heads", 4, 1)
        };
        let sublayer = |name| Group {
            kind: UnitKind::Sublayer,
            ..channels(name, 1, 1)
        };
        let groups = [channels("a", 4, 128), heads, sublayer("s0"), sublayer("s1")];
        let logits = vec![
            vec![1.0, 2.0, 3.0, 4.0],
            vec![4.0, 3.0, 2.0, 1.0],
            vec![0.5],
            vec![-0.5],
        ];
        let trained = KeepSet(vec![vec![2, 3], vec![0, 1], vec![0], vec![]]);
        // Channels as wide as every multiple: roundings cannot move them, neighbours do.
        let c = candidates_of_trained(&groups, &logits, trained, &SearchOptions::default());
        assert_eq!(
            keep_named(&c, "channels −1"),
            Some(vec![vec![3], vec![0, 1], vec![0], vec![]])
        );
        assert_eq!(
            keep_named(&c, "channels +1"),
            Some(vec![vec![1, 2, 3], vec![0, 1], vec![0], vec![]])
        );
        assert_eq!(
            keep_named(&c, "sublayers +1"),
            Some(vec![vec![2, 3], vec![0, 1], vec![0], vec![0]])
        );
        assert_eq!(
            keep_named(&c, "sublayers −1"),
            Some(vec![vec![2, 3], vec![0, 1], vec![], vec![]])
        );
        assert!(c.len() >= FEW_CANDIDATES);
        assert!(few_candidates_warning(c.len()).is_none());
        assert!(few_candidates_warning(1).is_some_and(|w| w.contains("only 1")));
    }

    #[test]
    fn search_measures_every_listed_candidate_and_picks_best_within_target() {
        let groups = [channels("a", 4, 1)];
        let list: Vec<(String, KeepSet)> = (1..=4)
            .map(|k| (format!("k{k}"), KeepSet(vec![(0..k).collect()])))
            .collect();
        let mut measured = Vec::new();
        let mut measure = |keep: &KeepSet| {
            measured.push(keep.clone());
            let ms = keep.0[0].len() as f64;
            Ok(Measurement {
                latency: LatencyStats {
                    mean: ms,
                    p50: ms,
                    p95: ms,
                    std: 0.0,
                    runs: 1,
                },
                params: 0,
            })
        };
        let mut score = |keep: &KeepSet| 25.0 * keep.0[0].len() as f64;
        let (entries, _, pick) = search(
            &groups,
            list,
            2.5,
            SearchContext {
                measure: &mut measure,
                score: &mut score,
                observer: &crate::progress::Silent,
            },
        )
        .unwrap();
        assert_eq!(measured.len(), 4);
        assert_eq!(entries[pick].name, "k2");
        assert!(entries.iter().all(|e| e.pareto));
    }

    #[test]
    fn keep_meeting_target_moves_the_cut_to_the_first_logit_that_meets_it() {
        let groups = [channels("a", 4, 1), channels("b", 4, 1)];
        let logits = vec![vec![-3.0, -1.0, 2.0, 0.5], vec![-2.0, 1.0, -0.5, 3.0]];
        // One ms per kept unit.
        let predicted = |keep: &KeepSet| keep.0.iter().map(Vec::len).sum::<usize>() as f64;
        let at = |target_ms| keep_meeting_target(&groups, &logits, 1, target_ms, &predicted);
        // l > 0 keeps 4 units; a target of 6 brings back the two highest below 0.
        assert_eq!(at(6.0).0, vec![vec![1, 2, 3], vec![1, 2, 3]]);
        assert_eq!(at(8.0).0, vec![vec![0, 1, 2, 3], vec![0, 1, 2, 3]]);
        assert_eq!(at(3.0).0, vec![vec![2], vec![1, 3]]);
        // min_keep holds; an unreachable target gets the fewest units.
        assert_eq!(at(0.5).0, vec![vec![2], vec![3]]);
    }

    #[test]
    fn a_channel_multiple_does_not_round_heads() {
        let heads = Group {
            kind: UnitKind::Heads,
            ..channels("heads", 4, 1)
        };
        let groups = [channels("a", 4, 8), heads];
        let logits = vec![vec![1.0, 2.0, 3.0, 4.0], vec![1.0, 2.0, 3.0, 4.0]];
        let trained = KeepSet(vec![vec![1, 2, 3], vec![3]]);
        let options = SearchOptions {
            channel_multiples: vec![16],
            head_multiples: vec![2],
        };
        let c = candidates_of_trained(&groups, &logits, trained, &options);
        // ×16 rounds only the channels (3 units of 8 → 2 or 4); ×2 only the heads.
        assert_eq!(keep_named(&c, "×16 floor"), Some(vec![vec![2, 3], vec![3]]));
        // (×2 floor of one head is two heads too, the smallest step: listed once, as floor.)
        assert_eq!(
            keep_named(&c, "×2 floor"),
            Some(vec![vec![1, 2, 3], vec![2, 3]])
        );
    }

    #[test]
    fn cuts_meeting_target_correct_the_proxy_by_their_measurements() {
        let groups = [channels("a", 8, 1)];
        let logits = vec![vec![8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]];
        // The proxy counts one ms per unit; the device takes 1.5 ms per unit.
        let predicted = |keep: &KeepSet| keep.0[0].len() as f64;
        let mut measured = Vec::new();
        let mut measure = |keep: &KeepSet| {
            measured.push(keep.0[0].len());
            Ok(1.5 * keep.0[0].len() as f64)
        };
        let cuts =
            cuts_meeting_target(&groups, &logits, 1, 6.0, &predicted, &mut measure, 3).unwrap();
        // 6 units measure 9 ms; the goal shrinks to 4 ms: 4 units, 6 ms, which meets it.
        assert_eq!(measured, vec![6, 4]);
        let names: Vec<&str> = cuts.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, vec!["at target", "at target 2"]);
        assert_eq!(cuts[1].1 .0[0], vec![0, 1, 2, 3]);
    }
}
