//! Schedule expressions read in a time zone: the `cron` crate's seconds-aware form, the
//! classic five fields, and `@every <duration>`.
//!
//! - 7 fields: `sec min hour day-of-month month day-of-week year`.
//! - 6 fields: the same without the year.
//! - 5 fields: classic crontab, `min hour day-of-month month day-of-week`; it fires at
//!   second 0, and its day-of-week numbers mean what crontab means (0 or 7 Sunday,
//!   1 Monday … 6 Saturday). In the 6- and 7-field forms they are the `cron` crate's
//!   (1 Sunday … 7 Saturday); names (`MON-FRI`) mean the same everywhere.
//! - Unlike crontab, a day-of-month and a day-of-week both given must both match
//!   (`0 0 1 * MON`: the 1st, when it is a Monday), in every form.
//! - `@every 30s` (any `humantime` duration from 1 s to 366 days) fires at each whole
//!   multiple of the duration since the Unix epoch, whatever the time zone: the same
//!   times on every copy of the scheduler, so each fire has one identity.
//!
//! The scheduler fires them; the CLI reads them too, to refuse a bad one (an
//! Agentfile's, say) before anything is stored.

use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeZone as _, Utc};
use chrono_tz::Tz;

/// The longest expression accepted.
pub const MAX_EXPRESSION_BYTES: usize = 256;

/// The prefix of an interval expression.
pub const EVERY: &str = "@every";

/// The shortest and longest interval `@every` takes.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 24 * 3600);

/// A schedule expression read in a time zone.
#[derive(Debug, Clone)]
pub struct Expr(Kind);

#[derive(Debug, Clone)]
enum Kind {
    Cron {
        schedule: Box<cron::Schedule>,
        zone: Tz,
    },
    /// Every this many milliseconds, counted from the epoch.
    Every(i64),
}

impl Expr {
    /// Reads `expression` in `time_zone` (an IANA name; empty: UTC), or says precisely
    /// what is wrong with either.
    pub fn parse(expression: &str, time_zone: &str) -> Result<Self, String> {
        if expression.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "the expression is {} bytes; at most {MAX_EXPRESSION_BYTES}",
                expression.len()
            ));
        }
        let zone = match time_zone.trim() {
            "" => Tz::UTC,
            name => name.parse::<Tz>().map_err(|_| {
                format!("`{name}` is not an IANA time zone (say `UTC` or `Europe/Lisbon`)")
            })?,
        };
        if let Some(rest) = expression.trim().strip_prefix(EVERY) {
            return every(rest).map(|ms| Self(Kind::Every(ms)));
        }
        let fields: Vec<&str> = expression.split_whitespace().collect();
        let full = match fields.len() {
            5 => {
                let dow = crontab_days(fields[4])?;
                format!(
                    "0 {} {} {} {} {dow}",
                    fields[0], fields[1], fields[2], fields[3]
                )
            }
            6 | 7 => fields.join(" "),
            0 => return Err("the expression is empty".into()),
            n => {
                return Err(format!(
                    "`{expression}` has {n} fields; a cron expression has 5 (minute hour \
                     day-of-month month day-of-week), 6 (second first) or 7 (and a year)"
                ));
            }
        };
        let schedule = cron::Schedule::from_str(&full)
            .map_err(|e| format!("`{expression}` is not a cron expression: {e}"))?;
        Ok(Self(Kind::Cron {
            schedule: Box::new(schedule),
            zone,
        }))
    }

    /// True for an `@every` interval.
    pub fn is_interval(&self) -> bool {
        matches!(self.0, Kind::Every(_))
    }

    /// The first fire time strictly after `after_ms` (unix ms), if there is one.
    ///
    /// The `cron` crate's iterator can step back across a clock change (in the hour
    /// an autumn change repeats, it yields the first pass's time after the second's):
    /// whatever it yields at or before `after_ms` is passed over, so time only moves
    /// forward here.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let (schedule, zone) = match &self.0 {
            Kind::Every(ms) => return after_ms.div_euclid(*ms).checked_add(1)?.checked_mul(*ms),
            Kind::Cron { schedule, zone } => (schedule, zone),
        };
        let after = Utc.timestamp_millis_opt(after_ms).single()?;
        schedule
            .after(&after.with_timezone(zone))
            .map(|t| t.timestamp_millis())
            .take(MAX_STEPS_BACK)
            .find(|&t| t > after_ms)
    }

    /// The latest fire time at or before `at_ms`, if there is one.
    pub fn latest_at_or_before(&self, at_ms: i64) -> Option<i64> {
        let (schedule, zone) = match &self.0 {
            Kind::Every(ms) => return at_ms.div_euclid(*ms).checked_mul(*ms),
            Kind::Cron { schedule, zone } => (schedule, zone),
        };
        let after = Utc.timestamp_millis_opt(at_ms.checked_add(1)?).single()?;
        schedule
            .after(&after.with_timezone(zone))
            .rev()
            .map(|t| t.timestamp_millis())
            .take(MAX_STEPS_BACK)
            .find(|&t| t <= at_ms)
    }

    /// The fire times in `(after_ms, until_ms]`, oldest first, at most `cap` of them,
    /// and whether there were more.
    pub fn between(&self, after_ms: i64, until_ms: i64, cap: usize) -> (Vec<i64>, bool) {
        let mut times = Vec::new();
        let mut from = after_ms;
        while let Some(t) = self.next_after(from) {
            if t > until_ms {
                return (times, false);
            }
            if times.len() == cap {
                return (times, true);
            }
            times.push(t);
            from = t;
        }
        (times, false)
    }
}

/// The milliseconds of an `@every` interval (what follows the keyword).
fn every(rest: &str) -> Result<i64, String> {
    let text = rest.trim();
    if text.is_empty() || !rest.starts_with(char::is_whitespace) {
        return Err(format!(
            "`{EVERY}` takes a duration: `{EVERY} 30s`, `{EVERY} 5m`, `{EVERY} 1h30m`"
        ));
    }
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("`{EVERY} {text}`: `{text}` is not a duration ({e})"))?;
    if duration < MIN_EVERY || duration > MAX_EVERY {
        return Err(format!(
            "`{EVERY} {text}` is out of range: from 1s to 366 days"
        ));
    }
    Ok(duration.as_millis() as i64)
}

/// How many times the iterator may yield on the wrong side of the asked time before
/// one on the right side: a repeated hour of per-second fires is 3,600.
const MAX_STEPS_BACK: usize = 4000;

/// A crontab day-of-week field with its numbers as names: crontab counts from Sunday = 0
/// (7 too), the `cron` crate from Sunday = 1.
fn crontab_days(field: &str) -> Result<String, String> {
    const NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];
    let name = |token: &str| -> Result<String, String> {
        match token.parse::<usize>() {
            Ok(n) if n < NAMES.len() => Ok(NAMES[n].to_owned()),
            Ok(n) => Err(format!(
                "day-of-week {n} is out of range: 0-7 (0 and 7 are Sunday)"
            )),
            Err(_) => Ok(token.to_owned()),
        }
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => (range, Some(step)),
                None => (item, None),
            };
            let range = match range.split_once('-') {
                // Crontab's 7 is Sunday again: a range up to it wraps round to it.
                Some((a, "7")) if step.is_none() => match name(a)?.as_str() {
                    "SUN" => "SUN-SAT".to_owned(),
                    a => format!("{a}-SAT,SUN"),
                },
                Some((a, b)) => format!("{}-{}", name(a)?, name(b)?),
                None => name(range)?,
            };
            Ok(match step {
                Some(step) => format!("{range}/{step}"),
                None => range,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|items| items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn the_three_forms_fire_when_they_say() {
        let every_two = Expr::parse("*/2 * * * * * *", "").unwrap();
        let start = ms("2026-01-01T00:00:00Z");
        assert_eq!(every_two.next_after(start), Some(start + 2000));
        let (times, more) = every_two.between(start, start + 6000, 10);
        assert_eq!(times, vec![start + 2000, start + 4000, start + 6000]);
        assert!(!more);
        let (times, more) = every_two.between(start, start + 60_000, 5);
        assert_eq!((times.len(), more), (5, true));
        assert_eq!(
            every_two.latest_at_or_before(start + 5_999),
            Some(start + 4000)
        );
        assert_eq!(
            every_two.latest_at_or_before(start + 6000),
            Some(start + 6000)
        );

        let six = Expr::parse("30 * * * * *", "UTC").unwrap();
        assert_eq!(six.next_after(start), Some(start + 30_000));
        // Crontab's 1-5 is Monday to Friday: 2026-01-01 is a Thursday, 01-03 a Saturday.
        let weekdays = Expr::parse("0 9 * * 1-5", "").unwrap();
        let friday = ms("2026-01-02T09:00:00Z");
        assert_eq!(
            weekdays.next_after(ms("2026-01-01T09:00:00Z")),
            Some(friday)
        );
        assert_eq!(
            weekdays.next_after(friday),
            Some(ms("2026-01-05T09:00:00Z")),
            "the weekend is skipped"
        );
        let sunday = Expr::parse("0 0 * * 0", "").unwrap();
        assert_eq!(sunday.next_after(start), Some(ms("2026-01-04T00:00:00Z")));
    }

    #[test]
    fn crontab_day_ranges_up_to_seven_end_on_sunday() {
        let saturday = ms("2026-01-03T00:00:00Z");
        for (field, next) in [
            ("0-7", "2026-01-04T00:00:00Z"),
            ("1-7", "2026-01-04T00:00:00Z"),
            ("5-7", "2026-01-04T00:00:00Z"),
        ] {
            let expr = Expr::parse(&format!("0 0 * * {field}"), "").unwrap();
            assert_eq!(expr.next_after(saturday), Some(ms(next)), "{field}");
        }
        let weekend = Expr::parse("0 0 * * 6-7", "").unwrap();
        assert_eq!(
            weekend.next_after(ms("2026-01-02T00:00:00Z")),
            Some(saturday)
        );
    }

    #[test]
    fn time_only_moves_forward_across_a_clock_change() {
        // New York's clocks went back at 06:00Z on 2025-11-02: 01:00-02:00 local came
        // twice. Every five minutes through it, nothing is returned twice or backwards.
        let every_five = Expr::parse("*/5 * * * *", "America/New_York").unwrap();
        let start = ms("2025-11-02T04:30:00Z");
        let (times, _) = every_five.between(start, ms("2025-11-02T08:00:00Z"), 100);
        assert!(times.windows(2).all(|w| w[1] > w[0]), "{times:?}");
        let mut at = ms("2025-11-02T06:10:00Z");
        for _ in 0..30 {
            let next = every_five.next_after(at).unwrap();
            assert!(next > at && next - at <= 5 * 60_000, "{at} -> {next}");
            at = next;
        }
        let latest = every_five
            .latest_at_or_before(ms("2025-11-02T06:12:00Z"))
            .unwrap();
        assert!(latest <= ms("2025-11-02T06:12:00Z"), "{latest}");
    }

    #[test]
    fn every_fires_on_the_multiples_of_its_interval() {
        let every = Expr::parse("@every 30s", "Europe/Lisbon").unwrap();
        assert!(every.is_interval());
        let start = ms("2026-01-01T00:00:10Z");
        assert_eq!(every.next_after(start), Some(ms("2026-01-01T00:00:30Z")));
        assert_eq!(
            every.next_after(ms("2026-01-01T00:00:30Z")),
            Some(ms("2026-01-01T00:01:00Z"))
        );
        assert_eq!(
            every.latest_at_or_before(ms("2026-01-01T00:00:59.999Z")),
            Some(ms("2026-01-01T00:00:30Z"))
        );
        let (times, more) = every.between(start, start + 60_000, 10);
        assert_eq!((times.len(), more), (2, false));
        assert!(!Expr::parse("*/2 * * * * * *", "").unwrap().is_interval());
        for (bad, said) in [
            ("@every", "takes a duration"),
            ("@everyday", "takes a duration"),
            ("@every soon", "not a duration"),
            ("@every 10ms", "out of range"),
            ("@every 400days", "out of range"),
        ] {
            let error = Expr::parse(bad, "").unwrap_err();
            assert!(error.contains(said), "{bad}: {error}");
        }
    }

    #[test]
    fn a_time_zone_moves_the_fire_time() {
        let nine = Expr::parse("0 9 * * *", "America/New_York").unwrap();
        assert_eq!(
            nine.next_after(ms("2026-01-01T00:00:00Z")),
            Some(ms("2026-01-01T14:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_precisely() {
        let cases = [
            ("", "", "empty"),
            ("* * *", "", "has 3 fields"),
            ("* * * * * * * *", "", "has 8 fields"),
            ("61 * * * *", "", "not a cron expression"),
            ("0 9 * * 8", "", "day-of-week 8 is out of range"),
            ("0 9 * * *", "Mars/Olympus", "not an IANA time zone"),
        ];
        for (expression, zone, said) in cases {
            let error = Expr::parse(expression, zone).unwrap_err();
            assert!(error.contains(said), "{expression:?} {zone:?}: {error}");
        }
        let long = "*".repeat(MAX_EXPRESSION_BYTES + 1);
        assert!(Expr::parse(&long, "").unwrap_err().contains("at most"));
    }
}
