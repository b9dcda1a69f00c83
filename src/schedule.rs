//! When sweeps are due: a fixed interval or a cron expression in UTC.

use chrono::{DateTime, Utc};
use croner::Cron;

use crate::api::retentionpolicy::Schedule;
use crate::api::{Duration, Timestamp};

/// The default schedule: every hour.
pub const DEFAULT_INTERVAL_SECS: u64 = 3600;

#[derive(Clone, Debug)]
pub enum Parsed {
    Every(Duration),
    Cron(Box<Cron>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("schedule.cron {0:?} is not a valid five-field cron expression: {1}")]
    InvalidCron(String, String),
    #[error("schedule.every must be at least 1s")]
    ZeroInterval,
}

pub fn parse(schedule: Option<&Schedule>) -> Result<Parsed, Error> {
    match schedule {
        Some(Schedule {
            cron: Some(expr), ..
        }) => Cron::new(expr)
            .parse()
            .map(|c| Parsed::Cron(Box::new(c)))
            .map_err(|e| Error::InvalidCron(expr.clone(), e.to_string())),
        Some(Schedule {
            every: Some(every), ..
        }) if every.as_secs() == 0 => Err(Error::ZeroInterval),
        Some(Schedule {
            every: Some(every), ..
        }) => Ok(Parsed::Every(*every)),
        _ => Ok(Parsed::Every(Duration::from_secs(DEFAULT_INTERVAL_SECS))),
    }
}

impl Parsed {
    /// When the next sweep is due. `last_start` is when the previous sweep started (None
    /// before the first); `created` is when the policy was created. An interval schedule
    /// sweeps at once when first created; a cron schedule waits for its first occurrence.
    pub fn next_after(
        &self,
        last_start: Option<Timestamp>,
        created: Timestamp,
    ) -> Option<Timestamp> {
        match (self, last_start) {
            (Parsed::Every(_), None) => Some(created),
            // Checked: no interval, however long, can panic here (None: no next sweep).
            (Parsed::Every(every), Some(last)) => {
                last.0.checked_add_signed(every.as_chrono()).map(Timestamp)
            }
            (Parsed::Cron(cron), last) => {
                let from: DateTime<Utc> = last.unwrap_or(created).0;
                cron.find_next_occurrence(&from, false)
                    .ok()
                    .map(Timestamp::truncate)
            }
        }
    }

    /// A rough period, used to judge when a sweep is overdue.
    pub fn period_secs(&self, now: Timestamp) -> u64 {
        match self {
            Parsed::Every(every) => every.as_secs(),
            Parsed::Cron(cron) => {
                let first = cron.find_next_occurrence(&now.0, false).ok();
                let second = first.and_then(|f| cron.find_next_occurrence(&f, false).ok());
                match (first, second) {
                    (Some(a), Some(b)) => (b - a).num_seconds().max(1) as u64,
                    _ => DEFAULT_INTERVAL_SECS,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ts(s: &str) -> Timestamp {
        Timestamp(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn interval_sweeps_at_once_then_every_interval() {
        let p = parse(Some(&Schedule {
            every: Some("15m".parse().unwrap()),
            cron: None,
        }))
        .unwrap();
        let created = ts("2026-11-20T09:00:00Z");
        assert_eq!(p.next_after(None, created), Some(created));
        assert_eq!(
            p.next_after(Some(ts("2026-11-20T10:00:00Z")), created),
            Some(ts("2026-11-20T10:15:00Z"))
        );
    }

    #[test]
    fn an_interval_beyond_the_calendar_has_no_next_sweep_instead_of_panicking() {
        let p = parse(Some(&Schedule {
            every: Some("99999999999999999999w".parse().unwrap()),
            cron: None,
        }))
        .unwrap();
        let t = ts("2026-11-20T09:00:00Z");
        assert_eq!(p.next_after(Some(t), t), None);
        let p = parse(Some(&Schedule {
            every: Some("1000000000w".parse().unwrap()),
            cron: None,
        }))
        .unwrap();
        assert_eq!(p.next_after(Some(t), t), None);
    }

    #[test]
    fn default_is_hourly() {
        let p = parse(None).unwrap();
        let created = ts("2026-11-20T09:00:00Z");
        assert_eq!(
            p.next_after(Some(created), created),
            Some(ts("2026-11-20T10:00:00Z"))
        );
        assert_eq!(p.period_secs(created), 3600);
    }

    #[test]
    fn cron_waits_for_its_next_occurrence() {
        let p = parse(Some(&Schedule {
            every: None,
            cron: Some("0 3 * * *".into()),
        }))
        .unwrap();
        let created = ts("2026-11-20T09:00:00Z");
        assert_eq!(
            p.next_after(None, created),
            Some(ts("2026-11-21T03:00:00Z"))
        );
        assert_eq!(
            p.next_after(Some(ts("2026-11-21T03:00:00Z")), created),
            Some(ts("2026-11-22T03:00:00Z"))
        );
        assert_eq!(
            p.period_secs(Timestamp(Utc.timestamp_opt(0, 0).unwrap())),
            86_400
        );
    }

    #[test]
    fn bad_cron_is_an_error() {
        assert!(matches!(
            parse(Some(&Schedule {
                every: None,
                cron: Some("every day".into())
            })),
            Err(Error::InvalidCron(..))
        ));
        assert_eq!(
            parse(Some(&Schedule {
                every: Some("0s".parse().unwrap()),
                cron: None
            }))
            .unwrap_err(),
            Error::ZeroInterval
        );
    }
}
