//! Scoring of detections against labels: the NAB score (rules as stated in the NAB
//! development subset's README) and event-level metrics for the synthetic series.

/// A NAB cost profile: weights of a true positive, a false positive, a false negative.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Name as NAB spells it.
    pub name: &'static str,
    /// Weight of a detected window.
    pub a_tp: f64,
    /// Weight of a false detection.
    pub a_fp: f64,
    /// Cost of a missed window.
    pub a_fn: f64,
}

/// NAB's three profiles.
pub const PROFILES: [Profile; 3] = [
    Profile {
        name: "standard",
        a_tp: 1.0,
        a_fp: 0.11,
        a_fn: 1.0,
    },
    Profile {
        name: "reward_low_FP",
        a_tp: 1.0,
        a_fp: 0.22,
        a_fn: 1.0,
    },
    Profile {
        name: "reward_low_FN",
        a_tp: 1.0,
        a_fp: 0.11,
        a_fn: 2.0,
    },
];

/// NAB's scaled sigmoid: `2/(1+exp(5x)) − 1`, and −1 beyond `x > 3`.
pub fn sigma(x: f64) -> f64 {
    if x > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }
}

/// Rows at the start of a file that are not scored: `min(floor(0.15·N), 750)`.
pub fn probation(rows: usize) -> usize {
    (rows * 15 / 100).min(750)
}

/// The score of one file under one profile.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FileScore {
    /// Raw score (sum of rewards and costs).
    pub raw: f64,
    /// Windows with at least one scored detection.
    pub windows_detected: usize,
    /// Scored detections outside every window.
    pub false_rows: usize,
    /// Rows after probation.
    pub scored_rows: usize,
    /// Rows after probation outside every window (the normal rows).
    pub normal_rows: usize,
}

/// Scores one file: `windows` are inclusive row ranges, sorted and disjoint;
/// `detections[i]` says whether row `i` was flagged.
pub fn score_file(detections: &[bool], windows: &[(usize, usize)], profile: &Profile) -> FileScore {
    let n = detections.len();
    let start = probation(n);
    let in_windows: usize = windows
        .iter()
        .filter(|&&(_, e)| e >= start && e < n)
        .map(|&(s, e)| e - s.max(start) + 1)
        .sum();
    let mut out = FileScore {
        scored_rows: n.saturating_sub(start),
        normal_rows: n.saturating_sub(start).saturating_sub(in_windows),
        ..FileScore::default()
    };
    let mut best: Vec<Option<f64>> = vec![None; windows.len()];
    for (i, _) in detections
        .iter()
        .enumerate()
        .skip(start)
        .filter(|(_, d)| **d)
    {
        if let Some(w) = windows.iter().position(|&(s, e)| s <= i && i <= e) {
            if best[w].is_none() {
                let (_, e) = windows[w];
                let width = (windows[w].1 - windows[w].0 + 1) as f64;
                let reward = profile.a_tp * sigma(-((e - i + 1) as f64) / width) / sigma(-1.0);
                best[w] = Some(reward);
            }
            continue;
        }
        out.false_rows += 1;
        let previous = windows.iter().rev().find(|&&(_, e)| e < i);
        out.raw += match previous {
            None => -profile.a_fp,
            Some(&(s, e)) => {
                let width = (e - s + 1) as f64;
                profile.a_fp * sigma((i - e) as f64 / (width - 1.0).max(1.0))
            }
        };
    }
    for b in &best {
        match b {
            Some(reward) => {
                out.raw += reward;
                out.windows_detected += 1;
            }
            None => out.raw -= profile.a_fn,
        }
    }
    out
}

/// `100 · (S − S_null) / (S_perfect − S_null)` over a corpus of `windows` windows.
pub fn normalized(raw: f64, windows: usize, profile: &Profile) -> f64 {
    let null = -profile.a_fn * windows as f64;
    let perfect = profile.a_tp * windows as f64;
    if perfect == null {
        return 0.0;
    }
    100.0 * (raw - null) / (perfect - null)
}

/// Event-level counts of one signal on labeled series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EventCounts {
    /// Labeled events.
    pub events: usize,
    /// Events with at least one flagged sample inside their span.
    pub found: usize,
    /// Scored samples outside every event span.
    pub normal: usize,
    /// Flagged samples among `normal`.
    pub false_positives: usize,
    /// Flagged scored samples inside an event span.
    pub true_flags: usize,
}

impl EventCounts {
    /// Counts one series: `spans` are half-open `[start, end)`; samples before `skip`
    /// (the warm-up) are not scored.
    pub fn add(&mut self, flags: &[bool], spans: &[(usize, usize)], skip: usize) {
        self.events += spans.len();
        self.found += spans
            .iter()
            .filter(|&&(s, e)| {
                flags[s.max(skip).min(flags.len())..e.min(flags.len())].contains(&true)
            })
            .count();
        for (i, &flag) in flags.iter().enumerate().skip(skip) {
            let inside = spans.iter().any(|&(s, e)| s <= i && i < e);
            if inside {
                self.true_flags += usize::from(flag);
            } else {
                self.normal += 1;
                self.false_positives += usize::from(flag);
            }
        }
    }

    /// Found events / events.
    pub fn recall(&self) -> f64 {
        ratio(self.found, self.events)
    }

    /// Flagged normal samples / normal samples.
    pub fn fp_rate(&self) -> f64 {
        ratio(self.false_positives, self.normal)
    }

    /// Flagged samples inside spans / all flagged samples (1 when nothing is flagged).
    pub fn precision(&self) -> f64 {
        let flagged = self.true_flags + self.false_positives;
        if flagged == 0 {
            1.0
        } else {
            ratio(self.true_flags, flagged)
        }
    }

    /// Harmonic mean of precision and event recall.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: Profile = PROFILES[0];

    fn flags(n: usize, at: &[usize]) -> Vec<bool> {
        let mut v = vec![false; n];
        for &i in at {
            v[i] = true;
        }
        v
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn sigma_matches_hand_values() {
        assert!(close(sigma(0.0), 0.0));
        // 2/(1+e^-5) - 1 = 0.986614298...
        assert!(close(sigma(-1.0), 0.986_614_298_151_430_3));
        assert_eq!(sigma(3.5), -1.0);
        assert!(close(sigma(1.0), -0.986_614_298_151_430_3));
    }

    #[test]
    fn probation_is_fifteen_percent_capped() {
        assert_eq!(probation(100), 15);
        assert_eq!(probation(1000), 150);
        assert_eq!(probation(10_000), 750);
        assert_eq!(probation(6), 0);
    }

    #[test]
    fn detection_at_window_start_is_worth_one() {
        // 100 rows (probation 15), one window [40, 49], width 10.
        let s = score_file(&flags(100, &[40]), &[(40, 49)], &STD);
        assert!(close(s.raw, 1.0), "{}", s.raw);
        assert_eq!(
            (s.windows_detected, s.false_rows, s.scored_rows),
            (1, 0, 85)
        );
    }

    #[test]
    fn only_the_earliest_detection_of_a_window_counts() {
        // At row 45: e-i+1 = 5, 5/10 = 0.5: sigma(-0.5)/sigma(-1).
        let want = (2.0 / (1.0 + (-2.5f64).exp()) - 1.0) / 0.986_614_298_151_430_3;
        let s = score_file(&flags(100, &[45, 46, 49]), &[(40, 49)], &STD);
        assert!(close(s.raw, want), "{} vs {want}", s.raw);
        assert!((want - 0.859_79).abs() < 1e-4, "{want}");
        assert_eq!(s.false_rows, 0);
    }

    #[test]
    fn missed_window_and_false_positives_cost() {
        // Detection before the first window: -A_FP. Window missed: -A_FN.
        let s = score_file(&flags(100, &[20]), &[(40, 49)], &STD);
        assert!(close(s.raw, -0.11 - 1.0), "{}", s.raw);
        assert_eq!((s.windows_detected, s.false_rows), (0, 1));
        // Detections in probation are not scored at all.
        let s = score_file(&flags(100, &[3, 14]), &[(40, 49)], &STD);
        assert!(close(s.raw, -1.0));
        assert_eq!(s.false_rows, 0);
    }

    #[test]
    fn false_positive_after_a_window_decays_with_distance() {
        // Window [40, 49] (W = 10), detection at 58: x = 9/9 = 1 -> 0.11 * sigma(1).
        let s = score_file(&flags(100, &[40, 58]), &[(40, 49)], &STD);
        assert!(close(s.raw, 1.0 + 0.11 * sigma(1.0)), "{}", s.raw);
        // Right after the window it costs almost nothing: x = 1/9.
        let s = score_file(&flags(100, &[40, 50]), &[(40, 49)], &STD);
        assert!(close(s.raw, 1.0 + 0.11 * sigma(1.0 / 9.0)));
        // Beyond three widths it costs the full A_FP: x = 40/9 > 3.
        let s = score_file(&flags(100, &[40, 89]), &[(40, 49)], &STD);
        assert!(close(s.raw, 1.0 - 0.11));
        let low_fp = score_file(&flags(100, &[40, 89]), &[(40, 49)], &PROFILES[1]);
        assert!(close(low_fp.raw, 1.0 - 0.22));
    }

    #[test]
    fn normalization_maps_null_to_zero_and_perfect_to_hundred() {
        assert!(close(normalized(-5.0, 5, &STD), 0.0));
        assert!(close(normalized(5.0, 5, &STD), 100.0));
        assert!(close(normalized(0.0, 5, &STD), 50.0));
        // Low-FN: S_null = -2 per window, so detecting nothing in 2 windows: 0, and
        // raw 0 is 2/3 of the way.
        let low_fn = &PROFILES[2];
        assert!(close(normalized(-4.0, 2, low_fn), 0.0));
        assert!(close(normalized(0.0, 2, low_fn), 100.0 * 4.0 / 6.0));
    }

    #[test]
    fn event_counts_by_hand() {
        // 20 samples, warm-up 2, spans [5,7) and [12,13); flags at 1 (warm-up),
        // 6 (event 1), 9 and 10 (normal).
        let mut c = EventCounts::default();
        c.add(&flags(20, &[1, 6, 9, 10]), &[(5, 7), (12, 13)], 2);
        assert_eq!(c.events, 2);
        assert_eq!(c.found, 1);
        assert_eq!(c.normal, 15);
        assert_eq!(c.false_positives, 2);
        assert_eq!(c.true_flags, 1);
        assert!(close(c.recall(), 0.5));
        assert!(close(c.fp_rate(), 2.0 / 15.0));
        assert!(close(c.precision(), 1.0 / 3.0));
        assert!(close(c.f1(), 2.0 * (1.0 / 3.0) * 0.5 / (1.0 / 3.0 + 0.5)));
    }
}
