//! The schedule file (`jobs/schedule.toml`): parsed and checked in full before the scheduler
//! starts, so a bad file stops start-up with an error naming the entry at fault.
//!
//! ```toml
//! timezone = "Europe/Berlin"   # IANA name, required
//!
//! [[job]]
//! name = "warm_cache"          # unique, [a-z0-9_-]+
//! cron = "0 0 2 * * *"         # 6 fields: sec min hour day-of-month month day-of-week
//! kind = "warm_cache"          # a registered job kind
//! args = { days = 30 }         # checked against the kind's payload (default {})
//! enabled = true               # default true
//! ```

use super::tick::Timetable;
use crate::{jobs::registry, queue::NewJob};
use chrono::Utc;
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use serde::Deserialize;
use std::path::Path;

/// The schedule the binary ships with (the repository's `jobs/schedule.toml`).
pub const BUILTIN: &str = include_str!("../../jobs/schedule.toml");

/// What is wrong with a schedule file.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The file could not be read.
    #[error("cannot read schedule file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or its top level is malformed.
    #[error("schedule file {origin}: {message}")]
    File {
        /// The file (or `built-in`).
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// One entry is wrong.
    #[error("schedule file {origin}: job {entry}: {message}")]
    Entry {
        /// The file (or `built-in`).
        origin: String,
        /// The entry's name (or `#n` when it has none).
        entry: String,
        /// What is wrong.
        message: String,
    },
}

/// A checked schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Where it was read from (a path, or `built-in`).
    pub origin: String,
    /// The zone every entry's cron is read in.
    pub timezone: Tz,
    /// The entries, in file order (disabled ones included).
    pub entries: Vec<Entry>,
}

/// One checked entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Unique name: the `cron:{name}:{tick}` dedup key of its jobs.
    pub name: String,
    /// The cron pattern as written.
    pub cron: String,
    /// When it fires.
    pub timetable: Timetable,
    /// The job it enqueues (kind and checked arguments).
    pub job: NewJob,
    /// Disabled entries are listed but never enqueued.
    pub enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    timezone: Option<String>,
    #[serde(default)]
    job: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    cron: String,
    kind: String,
    #[serde(default)]
    args: toml::Table,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

impl Schedule {
    /// Reads and checks the file at `path`, or the built-in schedule when `None`.
    pub fn load(path: Option<&Path>) -> Result<Schedule, ScheduleError> {
        match path {
            None => Schedule::parse(BUILTIN, "built-in"),
            Some(path) => {
                let origin = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ScheduleError::Read {
                    path: origin.clone(),
                    source,
                })?;
                Schedule::parse(&text, &origin)
            }
        }
    }

    /// Parses and checks a schedule; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Schedule, ScheduleError> {
        let file_error = |message: String| ScheduleError::File {
            origin: origin.to_string(),
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| file_error(e.message().to_string()))?;
        let zone = raw.timezone.ok_or_else(|| {
            file_error("`timezone` is required (an IANA name, e.g. \"UTC\")".into())
        })?;
        let timezone: Tz = zone.parse().map_err(|_| {
            file_error(format!(
                "unknown timezone {zone:?}: not an IANA timezone name"
            ))
        })?;
        let mut entries: Vec<Entry> = Vec::with_capacity(raw.job.len());
        for (i, table) in raw.job.into_iter().enumerate() {
            let label = match table.get("name").and_then(toml::Value::as_str) {
                Some(name) => format!("{name:?}"),
                None => format!("#{}", i + 1),
            };
            let entry = entry(table, timezone).map_err(|message| ScheduleError::Entry {
                origin: origin.to_string(),
                entry: label.clone(),
                message,
            })?;
            if entries.iter().any(|e| e.name == entry.name) {
                return Err(ScheduleError::Entry {
                    origin: origin.to_string(),
                    entry: label,
                    message: "duplicate name: another entry has it".into(),
                });
            }
            entries.push(entry);
        }
        Ok(Schedule {
            origin: origin.to_string(),
            timezone,
            entries,
        })
    }

    /// The entries that are enqueued.
    pub fn enabled(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.enabled)
    }
}

/// Checks one `[[job]]` table.
fn entry(table: toml::Table, timezone: Tz) -> Result<Entry, String> {
    let raw: RawEntry = table
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    if raw.name.is_empty()
        || !raw
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err("name must be made of a-z, 0-9, `_` and `-`".into());
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Required)
        .build()
        .parse(&raw.cron)
        .map_err(|e| {
            format!(
                "bad cron {:?}: {e} (6 fields: sec min hour day-of-month month day-of-week)",
                raw.cron
            )
        })?;
    let timetable = Timetable::new(cron, timezone);
    if timetable.next_after(Utc::now()).is_none() {
        return Err(format!("cron {:?} never fires", raw.cron));
    }
    let Some(kind) = registry::find(&raw.kind) else {
        return Err(format!(
            "unknown kind {:?}; registered kinds: {}",
            raw.kind,
            registry::names().join(", ")
        ));
    };
    let args = serde_json::to_value(&raw.args).map_err(|e| format!("bad args: {e}"))?;
    let job = kind.new_job(args)?;
    Ok(Entry {
        name: raw.name,
        cron: raw.cron,
        timetable,
        job,
        enabled: raw.enabled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        Schedule::parse(text, "test.toml").unwrap_err().to_string()
    }

    const ENTRY: &str = "[[job]]\nname = \"warm\"\ncron = \"0 0 2 * * *\"\nkind = \"warm_cache\"\n";

    #[test]
    fn the_builtin_schedule_is_valid_and_follows_the_spec() {
        let s = Schedule::load(None).unwrap();
        let rows: Vec<(&str, &str, &str)> = s
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.cron.as_str(), e.job.kind()))
            .collect();
        assert_eq!(
            rows,
            [
                ("warm_cache", "0 0 2 * * *", "warm_cache"),
                (
                    "refresh_rep_performance",
                    "0 0 3 * * *",
                    "refresh_rep_performance"
                ),
                ("maintain_tables", "0 0 4 * * Sun", "maintain_tables"),
            ]
        );
        assert!(s.entries.iter().all(|e| e.enabled));
        // The repository file is the built-in one.
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/schedule.toml");
        assert_eq!(Schedule::load(Some(&file)).unwrap().entries.len(), 3);
    }

    #[test]
    fn entries_can_be_disabled_and_args_default_to_empty() {
        let s = Schedule::parse(
            &format!("timezone = \"Europe/Berlin\"\n{ENTRY}enabled = false\n"),
            "t",
        )
        .unwrap();
        assert_eq!(s.timezone, chrono_tz::Europe::Berlin);
        assert!(!s.entries[0].enabled);
        assert_eq!(s.enabled().count(), 0);
    }

    #[test]
    fn every_error_names_the_entry() {
        let tz = "timezone = \"UTC\"\n";
        for (text, wanted) in [
            (
                format!("{tz}{}", ENTRY.replace("warm_cache\"", "x\"")),
                "job \"warm\": unknown kind \"x\"",
            ),
            (
                format!("{tz}{}", ENTRY.replace("0 0 2 * * *", "0 2 * *")),
                "job \"warm\": bad cron \"0 2 * *\"",
            ),
            (
                format!("{tz}{}", ENTRY.replace("0 0 2 * * *", "0 0 2 30 2 *")),
                "job \"warm\": cron \"0 0 2 30 2 *\" never fires",
            ),
            (
                format!("{tz}{ENTRY}{ENTRY}"),
                "job \"warm\": duplicate name",
            ),
            (
                format!("{tz}{ENTRY}when = \"now\"\n"),
                "job \"warm\": unknown field `when`",
            ),
            (
                format!("{tz}{ENTRY}args = {{ days = 0 }}\n"),
                "job \"warm\": invalid warm_cache arguments: days must be between 1",
            ),
            (
                format!("{tz}{ENTRY}args = {{ window_days = 90 }}\n"),
                "job \"warm\": invalid warm_cache arguments: unknown field `window_days`",
            ),
            (
                format!("{tz}{}", ENTRY.replace("\"warm\"", "\"Warm Cache\"")),
                "job \"Warm Cache\": name must be made of",
            ),
            (
                format!("{tz}{}", ENTRY.replace("name = \"warm\"\n", "")),
                "job #1: missing field `name`",
            ),
            (
                format!("timezone = \"Mars/Olympus\"\n{ENTRY}"),
                "unknown timezone \"Mars/Olympus\"",
            ),
            (ENTRY.to_string(), "`timezone` is required"),
            (format!("{tz}zone = 1\n{ENTRY}"), "unknown field `zone`"),
        ] {
            let err = error(&text);
            assert!(err.starts_with("schedule file test.toml: "), "{err}");
            assert!(err.contains(wanted), "{err}\nwanted: {wanted}");
        }
    }
}
