//! Tick computation: when a cron entry fires, in its IANA timezone, across daylight-saving
//! changes, and which tick is due now.
//!
//! croner walks *naive local* times (carried as `DateTime<Utc>`, which has no DST), and each
//! naive match is then placed in the real zone:
//! - a local time that does not exist (spring forward) fires at the first instant after the
//!   gap (02:30 on a day New York skips 02:00–03:00 fires at 03:00 EDT);
//! - a local time that happens twice (fall back) fires at its first occurrence only.
//!
//! So the instants of a schedule are non-decreasing in its naive matches; matches that land
//! on the same instant (several in one gap) are one tick. Only forward search is used.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A cron pattern in a timezone: the instants it fires at.
#[derive(Clone, Debug)]
pub struct Timetable {
    cron: Cron,
    tz: Tz,
}

impl Timetable {
    /// The ticks of `cron` (6 fields, seconds first) read in `tz`.
    pub fn new(cron: Cron, tz: Tz) -> Self {
        Self { cron, tz }
    }

    /// The timezone ticks are read in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// Every tick at or after `lower`, in increasing order (ends only if the pattern
    /// never matches again).
    pub fn ticks_from(&self, lower: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let lower = ceil_to_second(lower);
        // The earliest naive time that can land at or after `lower`: with the offset in force
        // just before `lower` as well, so matches inside a gap that ends at `lower` count.
        let offset = self
            .offset_at(lower)
            .min(self.offset_at(lower - Duration::seconds(1)));
        let mut cursor = Some(naive_carrier(lower.naive_utc() + offset));
        let mut previous: Option<DateTime<Utc>> = None;
        std::iter::from_fn(move || {
            loop {
                let naive = self.cron.find_next_occurrence(&cursor?, true).ok();
                cursor = naive.and_then(|n| n.checked_add_signed(Duration::seconds(1)));
                let tick = self.resolve(naive?.naive_utc());
                if tick >= lower && previous.is_none_or(|p| tick > p) {
                    previous = Some(tick);
                    return Some(tick);
                }
            }
        })
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.ticks_from(after + Duration::seconds(1)).next()
    }

    /// The tick to enqueue at `now`: the latest tick ≤ `now` that is later than `last` (the
    /// last tick enqueued) and no older than `now - grace`. Ticks missed before that are not
    /// replayed: after downtime there is at most one catch-up.
    pub fn due(
        &self,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        grace: std::time::Duration,
    ) -> Option<DateTime<Utc>> {
        let grace = Duration::from_std(grace).unwrap_or(Duration::MAX);
        let mut lower = now
            .checked_sub_signed(grace)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        if let Some(last) = last {
            lower = lower.max(last + Duration::seconds(1));
        }
        self.ticks_from(lower).take_while(|t| *t <= now).last()
    }

    /// The UTC offset of the zone at `instant`.
    fn offset_at(&self, instant: DateTime<Utc>) -> Duration {
        let seconds = self.tz.offset_from_utc_datetime(&instant.naive_utc()).fix();
        Duration::seconds(i64::from(seconds.local_minus_utc()))
    }

    /// The instant a naive local match fires at.
    fn resolve(&self, local: NaiveDateTime) -> DateTime<Utc> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            LocalResult::None => self.gap_end(local),
        }
    }

    /// The first instant whose local time is later than `local`, which lies in a gap: found
    /// by bisection between the readings of `local` with the offsets around the gap.
    fn gap_end(&self, local: NaiveDateTime) -> DateTime<Utc> {
        let as_utc = naive_carrier(local);
        let day = Duration::days(1);
        let a = as_utc - self.offset_at(as_utc - day);
        let b = as_utc - self.offset_at(as_utc + day);
        let (mut lo, mut hi) = (a.min(b).timestamp(), a.max(b).timestamp());
        let local_at = |secs: i64| {
            DateTime::from_timestamp(secs, 0).map(|t| t.with_timezone(&self.tz).naive_local())
        };
        // Invariant: local(lo) <= local, local(hi) > local; whole seconds only.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if local_at(mid).is_some_and(|l| l > local) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        DateTime::from_timestamp(hi, 0).unwrap_or(b)
    }
}

/// A naive local time carried as UTC (no DST), the form croner searches in.
fn naive_carrier(naive: NaiveDateTime) -> DateTime<Utc> {
    Utc.from_utc_datetime(&naive)
}

/// `t` rounded up to a whole second (ticks are whole seconds).
fn ceil_to_second(t: DateTime<Utc>) -> DateTime<Utc> {
    match t.with_nanosecond(0) {
        Some(whole) if whole < t => whole + Duration::seconds(1),
        Some(whole) => whole,
        None => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use croner::parser::{CronParser, Seconds};
    use std::time::Duration as StdDuration;

    fn table(cron: &str, tz: &str) -> Timetable {
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .build()
            .parse(cron)
            .unwrap();
        Timetable::new(cron, tz.parse().unwrap())
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn ticks(t: &Timetable, from: &str, n: usize) -> Vec<String> {
        t.ticks_from(at(from))
            .take(n)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .collect()
    }

    #[test]
    fn spring_forward_fires_at_the_end_of_the_gap() {
        // New York skips 02:00-03:00 EST on 2026-03-08: 02:30 does not exist that day.
        let t = table("0 30 2 * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-03-07T00:00:00Z", 3),
            [
                "2026-03-07T07:30:00Z", // 02:30 EST
                "2026-03-08T07:00:00Z", // 03:00 EDT, the first instant after the gap
                "2026-03-09T06:30:00Z", // 02:30 EDT
            ]
        );
        let t = table("0 0 4 * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-03-07T00:00:00Z", 2),
            ["2026-03-07T09:00:00Z", "2026-03-08T08:00:00Z"]
        );
    }

    #[test]
    fn every_minute_in_a_gap_is_one_tick() {
        let t = table("0 * * * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-03-08T06:59:00Z", 3),
            [
                "2026-03-08T06:59:00Z", // 01:59 EST
                "2026-03-08T07:00:00Z", // 02:00-02:59 (skipped) and 03:00 EDT
                "2026-03-08T07:01:00Z",
            ]
        );
        // A lower bound right at the transition still sees the gap's tick.
        assert_eq!(
            ticks(&t, "2026-03-08T07:00:00Z", 1),
            ["2026-03-08T07:00:00Z"]
        );
    }

    #[test]
    fn fall_back_fires_at_the_first_occurrence_only() {
        // New York repeats 01:00-02:00 on 2026-11-01 (EDT, then EST).
        let t = table("0 30 1 * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-10-31T00:00:00Z", 3),
            [
                "2026-10-31T05:30:00Z", // 01:30 EDT
                "2026-11-01T05:30:00Z", // 01:30 EDT, first occurrence
                "2026-11-02T06:30:00Z", // 01:30 EST
            ]
        );
        // From inside the repeated hour, the second 01:30 is not a tick.
        assert_eq!(
            ticks(&t, "2026-11-01T06:00:00Z", 1),
            ["2026-11-02T06:30:00Z"]
        );
        let t = table("0 0 3 * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-10-31T00:00:00Z", 2),
            ["2026-10-31T07:00:00Z", "2026-11-01T08:00:00Z"]
        );
    }

    #[test]
    fn weekly_sunday_job_follows_the_zone() {
        let t = table("0 0 4 * * Sun", "Europe/Berlin");
        assert_eq!(
            ticks(&t, "2026-03-20T00:00:00Z", 3),
            [
                "2026-03-22T03:00:00Z", // CET
                "2026-03-29T02:00:00Z", // CEST from that night on
                "2026-04-05T02:00:00Z",
            ]
        );
        assert_eq!(
            t.next_after(at("2026-03-22T03:00:00Z")),
            Some(at("2026-03-29T02:00:00Z"))
        );
    }

    #[test]
    fn due_is_the_latest_tick_within_grace_and_after_the_last() {
        let t = table("0 0 * * * *", "UTC"); // hourly
        let hour = StdDuration::from_secs(3600);
        let now = at("2026-05-01T10:20:00Z");
        assert_eq!(t.due(None, now, hour), Some(at("2026-05-01T10:00:00Z")));
        // Several missed: only the latest, never the older ones.
        let last = Some(at("2026-05-01T06:00:00Z"));
        assert_eq!(t.due(last, now, hour), Some(at("2026-05-01T10:00:00Z")));
        // Already enqueued: nothing.
        assert_eq!(t.due(Some(at("2026-05-01T10:00:00Z")), now, hour), None);
        // The latest tick is older than the grace: nothing.
        assert_eq!(t.due(None, now, StdDuration::from_secs(600)), None);
        // Exactly on the tick.
        let on = at("2026-05-01T10:00:00Z");
        assert_eq!(t.due(None, on, StdDuration::ZERO), Some(on));
        let daily = table("0 0 3 * * *", "UTC");
        assert_eq!(daily.due(None, at("2026-05-01T05:00:00Z"), hour), None);
    }

    #[test]
    fn due_across_spring_forward_is_the_gap_tick() {
        let t = table("0 30 2 * * *", "America/New_York");
        let now = at("2026-03-08T07:00:05Z");
        let due = t.due(None, now, StdDuration::from_secs(60));
        assert_eq!(due, Some(at("2026-03-08T07:00:00Z")));
        assert_eq!(
            t.due(
                due,
                at("2026-03-08T08:00:00Z"),
                StdDuration::from_secs(7200)
            ),
            None
        );
    }

    #[test]
    fn fractional_bounds_round_to_whole_seconds() {
        let t = table("* * * * * *", "UTC");
        assert_eq!(
            t.ticks_from(at("2026-01-01T00:00:00.250Z")).next(),
            Some(at("2026-01-01T00:00:01Z"))
        );
        assert_eq!(
            t.due(
                None,
                at("2026-01-01T00:00:00.250Z"),
                StdDuration::from_secs(5)
            ),
            Some(at("2026-01-01T00:00:00Z"))
        );
    }
}
