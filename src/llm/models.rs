//! The model table (`jobs/models.toml`): per model id its prices, limits and lifecycle.
//! Models are retired on dates, so which model to use, what it costs and whether it still
//! answers are data that ops update, never constants in code. [`ModelTable::check`] is what
//! start-up asks: an unknown or retired model is an error naming the replacement, a
//! deprecated one a warning with its retirement date.

use chrono::NaiveDate;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The table shipped in `jobs/models.toml`.
const BUILTIN: &str = include_str!("../../jobs/models.toml");

/// Where a model is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Served.
    Active,
    /// Served until `retires_on`.
    Deprecated,
    /// The API answers 404.
    Retired,
}

/// One model's figures. Prices are USD per million tokens.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Display name.
    pub name: String,
    /// Lifecycle state.
    pub status: Lifecycle,
    /// Retirement date (deprecated or retired models).
    #[serde(default)]
    pub retires_on: Option<NaiveDate>,
    /// The model to move to.
    #[serde(default)]
    pub replacement: Option<String>,
    /// Uncached input.
    pub input: f64,
    /// Cache write with the 5-minute TTL.
    pub cache_write_5m: f64,
    /// Cache write with the 1-hour TTL.
    pub cache_write_1h: f64,
    /// Cache read.
    pub cache_read: f64,
    /// Output (thinking included).
    pub output: f64,
    /// Factor applied to every price for Message Batches requests.
    pub batch_discount: f64,
    /// Shortest prompt prefix the model caches.
    pub min_cacheable_tokens: u32,
    /// Context window.
    pub context_tokens: u32,
    /// Largest `max_tokens`.
    pub max_output_tokens: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    models: BTreeMap<String, ModelInfo>,
}

/// Why a model cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// Not in the table.
    #[error("unknown model {id:?}; known models: {known}")]
    Unknown {
        /// The id asked for.
        id: String,
        /// The ids in the table.
        known: String,
    },
    /// Retired: the API answers 404.
    #[error("model {id:?} was retired on {on}; use {replacement}")]
    Retired {
        /// The id asked for.
        id: String,
        /// Retirement date.
        on: String,
        /// What to use instead.
        replacement: String,
    },
}

/// The model table.
#[derive(Clone, Debug)]
pub struct ModelTable {
    models: BTreeMap<String, ModelInfo>,
}

impl ModelTable {
    /// The table shipped with callcoach (parsed once).
    pub fn builtin() -> &'static Self {
        static TABLE: std::sync::OnceLock<ModelTable> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            Self::parse(BUILTIN).expect("jobs/models.toml is checked by the unit tests")
        })
    }

    /// Parses a table in the `jobs/models.toml` format, naming the problem on error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| format!("models table: {e}"))?;
        for (id, m) in &file.models {
            let prices = [
                m.input,
                m.cache_write_5m,
                m.cache_write_1h,
                m.cache_read,
                m.output,
            ];
            if prices.iter().any(|p| !p.is_finite() || *p < 0.0) {
                return Err(format!(
                    "models table: {id} has a negative or invalid price"
                ));
            }
            if m.status != Lifecycle::Active && m.retires_on.is_none() {
                return Err(format!(
                    "models table: {id} is {:?} but has no retires_on",
                    m.status
                ));
            }
        }
        Ok(Self {
            models: file.models,
        })
    }

    /// The figures of a model.
    pub fn get(&self, id: &str) -> Option<&ModelInfo> {
        self.models.get(id)
    }

    /// Whether `id` can be used on `today`: `Ok(Some(warning))` for a deprecated model,
    /// an error for an unknown or retired one (a deprecated model past its date is retired).
    pub fn check(&self, id: &str, today: NaiveDate) -> Result<Option<String>, ModelError> {
        let Some(model) = self.models.get(id) else {
            let known: Vec<&str> = self.usable(today).collect();
            return Err(ModelError::Unknown {
                id: id.to_string(),
                known: known.join(", "),
            });
        };
        let retired =
            model.status == Lifecycle::Retired || model.retires_on.is_some_and(|d| d <= today);
        let on = model.retires_on.map(|d| d.to_string()).unwrap_or_default();
        if retired {
            return Err(ModelError::Retired {
                id: id.to_string(),
                on,
                replacement: model
                    .replacement
                    .clone()
                    .unwrap_or_else(|| "a current model".into()),
            });
        }
        Ok((model.status == Lifecycle::Deprecated).then(|| {
            let instead = model.replacement.as_deref().unwrap_or("a current model");
            format!("model {id} is deprecated and retires on {on}; move to {instead}")
        }))
    }

    /// Ids still served on `today`.
    pub fn usable(&self, today: NaiveDate) -> impl Iterator<Item = &str> {
        self.models
            .iter()
            .filter(move |(_, m)| {
                m.status != Lifecycle::Retired && m.retires_on.is_none_or(|d| d > today)
            })
            .map(|(id, _)| id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn the_shipped_table_parses_and_has_the_current_line_up() {
        let table = ModelTable::builtin();
        let sonnet = table.get("claude-sonnet-5-5").unwrap();
        assert_eq!((sonnet.input, sonnet.output), (2.0, 10.0));
        assert_eq!(sonnet.cache_write_5m, sonnet.input * 1.25);
        assert_eq!(sonnet.cache_write_1h, sonnet.input * 2.0);
        assert_eq!(table.get("claude-opus-5-5").unwrap().output, 20.0);
        assert_eq!(table.get("claude-haiku-5-5").unwrap().input, 0.10);
    }

    #[test]
    fn lifecycle_decides_what_start_up_accepts() {
        let table = ModelTable::builtin();
        let today = day("2026-12-01");
        assert_eq!(table.check("claude-sonnet-5-5", today), Ok(None));
        let retired = table
            .check("claude-sonnet-4-5-20250929", today)
            .unwrap_err();
        assert!(
            retired.to_string().contains("claude-sonnet-5-5"),
            "{retired}"
        );
        assert!(retired.to_string().contains("2026-11-30"), "{retired}");
        let unknown = table.check("gpt-4", today).unwrap_err();
        assert!(
            unknown.to_string().contains("claude-sonnet-5-5"),
            "{unknown}"
        );
        assert!(!unknown.to_string().contains("claude-sonnet-4-5-20250929"));
    }

    #[test]
    fn a_deprecated_model_warns_until_its_date_then_is_retired() {
        let table = ModelTable::parse(
            r#"[models.m]
name = "M"
status = "deprecated"
retires_on = "2027-01-15"
replacement = "n"
input = 1.0
cache_write_5m = 1.25
cache_write_1h = 2.0
cache_read = 0.1
output = 5.0
batch_discount = 0.5
min_cacheable_tokens = 1024
context_tokens = 200000
max_output_tokens = 64000
"#,
        )
        .unwrap();
        let warning = table.check("m", day("2026-12-01")).unwrap().unwrap();
        assert!(
            warning.contains("2027-01-15") && warning.contains(" n"),
            "{warning}"
        );
        assert!(matches!(
            table.check("m", day("2027-01-15")),
            Err(ModelError::Retired { .. })
        ));
    }

    #[test]
    fn bad_tables_name_the_problem() {
        assert!(
            ModelTable::parse("[models.x]\nname = 1")
                .unwrap_err()
                .contains("models table")
        );
        let negative = BUILTIN.replacen("input = 2.00", "input = -2.00", 1);
        assert!(
            ModelTable::parse(&negative)
                .unwrap_err()
                .contains("claude-sonnet-5-5")
        );
    }
}
