//! The dashboard's HTML: the login page, the dashboard's panels and the error page, written
//! with `format!`/`write!`. Every string that comes from the database, the scheduler or the
//! request passes through [`escape`]; numbers and ids are formatted by Rust.

use super::data::{Dashboard, FINISHED, HitRates, JobTables, Schedule, ScheduleRow, Throughput};
use super::svg::{self, Bar, Series};
use crate::{
    http::{auth::Principal, html::escape},
    ledger::JobRow,
};
use chrono::{DateTime, Utc};
use std::fmt::Write as _;

/// Characters of a job's last error shown in the table (the whole text is its tooltip).
pub const ERROR_PREVIEW_CHARS: usize = 120;
/// Seconds between the page's automatic reloads.
pub const REFRESH_SECS: u32 = 15;

/// A page around `body`.
fn layout(title: &str, refresh: bool, body: &str) -> String {
    let refresh = if refresh {
        format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">")
    } else {
        String::new()
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/dashboard/style.css\"></head>\
         <body>{body}</body></html>",
        escape(title)
    )
}

/// The login form, with an error above it when a login failed.
pub fn login(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    layout(
        "callcoach dashboard: log in",
        false,
        &format!(
            "<main class=\"login\"><h1>callcoach dashboard</h1>{error}\
             <form method=\"post\" action=\"/dashboard/login\">\
             <label for=\"key\">API key (ops or admin scope)</label>\
             <input id=\"key\" name=\"key\" type=\"password\" autocomplete=\"off\" required>\
             <button type=\"submit\">Log in</button></form>\
             <p>Create a key with <code>callcoach apikey create --scope ops NAME</code>.</p></main>"
        ),
    )
}

/// A page for a refused or failed request, with a way back.
pub fn error(title: &str, message: &str) -> String {
    layout(
        title,
        false,
        &format!(
            "<main><h1>{}</h1><p>{}</p><p><a href=\"/dashboard\">Back to the dashboard</a></p></main>",
            escape(title),
            escape(message)
        ),
    )
}

/// The dashboard page: `csrf` goes into every form, `flash` (already worded) on top.
pub fn dashboard(
    data: &Dashboard,
    who: &Principal,
    csrf: &str,
    flash: Option<&str>,
    days: i32,
) -> String {
    let mut body = header(who, csrf);
    if let Some(flash) = flash {
        let _ = write!(
            body,
            "<p class=\"flash\" role=\"status\">{}</p>",
            escape(flash)
        );
    }
    body.push_str(&queues(&data.queue_depth, &data.throughput));
    body.push_str(&jobs(&data.jobs, csrf));
    body.push_str(&cache(data, days));
    body.push_str(&spend(data, days));
    body.push_str(&schedule(&data.schedule));
    layout("callcoach dashboard", true, &format!("<main>{body}</main>"))
}

fn header(who: &Principal, csrf: &str) -> String {
    format!(
        "<header><h1>callcoach</h1><nav><span>{} ({})</span> <a href=\"/docs\">API docs</a> \
         <form class=\"inline\" method=\"post\" action=\"/dashboard/logout\">{}\
         <button type=\"submit\">Log out</button></form></nav></header>",
        escape(&who.name),
        who.scope.as_str(),
        csrf_field(csrf)
    )
}

fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    )
}

fn queues(depth: &[(String, i64)], throughput: &Throughput) -> String {
    let mut rows = String::new();
    for (lane, n) in depth {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td class=\"num\">{n}</td></tr>",
            escape(lane)
        );
    }
    let labels: Vec<String> = throughput
        .hours
        .iter()
        .map(|h| h.format("%H:00").to_string())
        .collect();
    let colors = ["#27ae60", "#c0392b", "#7f8c8d"];
    let series: Vec<Series<'_>> = FINISHED
        .iter()
        .zip(colors)
        .zip(&throughput.counts)
        .map(|((state, color), counts)| Series {
            name: state.as_str(),
            color,
            values: counts.iter().map(|&n| Some(n as f64)).collect(),
        })
        .collect();
    format!(
        "<section id=\"queues\"><h2>Queues</h2><div class=\"row\"><div>\
         <h3>Waiting now (queued or snoozed)</h3>\
         <table><thead><tr><th>lane</th><th>jobs</th></tr></thead><tbody>{rows}</tbody></table>\
         </div><div class=\"chart\"><h3>Jobs finished per hour (UTC), last 24 h</h3>{}</div></div></section>",
        svg::line_chart("jobs finished per hour", &labels, &series, None, "")
    )
}

/// What a job table offers for its rows.
#[derive(Clone, Copy)]
enum Action {
    None,
    Cancel,
    Retry,
}

fn jobs(tables: &JobTables, csrf: &str) -> String {
    let mut html = String::from("<section id=\"jobs\"><h2>Jobs</h2>");
    html.push_str(&job_table("Running", &tables.running, Action::None, csrf));
    html.push_str(&job_table(
        "Waiting (queued or snoozed)",
        &tables.waiting,
        Action::Cancel,
        csrf,
    ));
    let _ = write!(
        html,
        "<form class=\"inline\" method=\"post\" action=\"/dashboard/jobs/replay-dead\">{}\
         <button type=\"submit\" id=\"replay-dead\">Replay all failed jobs</button></form>",
        csrf_field(csrf)
    );
    html.push_str(&job_table(
        "Failed (dead-letter list)",
        &tables.failed,
        Action::Retry,
        csrf,
    ));
    html.push_str(&job_table(
        "Cancelled",
        &tables.cancelled,
        Action::Retry,
        csrf,
    ));
    html.push_str(&job_table(
        "Recently succeeded",
        &tables.succeeded,
        Action::None,
        csrf,
    ));
    html.push_str("</section>");
    html
}

fn job_table(title: &str, rows: &[JobRow], action: Action, csrf: &str) -> String {
    let mut html = format!("<h3>{} ({})</h3>", escape(title), rows.len());
    if rows.is_empty() {
        html.push_str("<p class=\"empty\">none</p>");
        return html;
    }
    html.push_str(
        "<table class=\"jobs\"><thead><tr><th>job</th><th>kind</th><th>lane</th><th>status</th>\
         <th>attempts</th><th>last error</th><th>updated (UTC)</th><th></th></tr></thead><tbody>",
    );
    for job in rows {
        html.push_str(&job_row(job, action, csrf));
    }
    html.push_str("</tbody></table>");
    html
}

fn job_row(job: &JobRow, action: Action, csrf: &str) -> String {
    let error = job.last_error.as_deref().unwrap_or("");
    let mut preview: String = error.chars().take(ERROR_PREVIEW_CHARS).collect();
    if preview.len() < error.len() {
        preview.push('…');
    }
    let button = match action {
        Action::None => String::new(),
        Action::Cancel => action_form(job, "cancel", "Cancel", csrf),
        Action::Retry => action_form(job, "retry", "Retry", csrf),
    };
    format!(
        "<tr data-job=\"{id}\" data-status=\"{status}\"><td><code title=\"{id}\">{short}</code></td>\
         <td>{kind}</td><td>{lane}</td><td class=\"status-{status}\">{status}</td>\
         <td class=\"num\">{}/{}</td><td class=\"err\" title=\"{}\">{}</td><td>{}</td><td>{button}</td></tr>",
        job.attempts,
        job.max_attempts,
        escape(error),
        escape(&preview),
        time(job.updated_at),
        id = job.id,
        short = &job.id.simple().to_string()[24..],
        kind = escape(&job.kind),
        lane = job.lane.as_str(),
        status = job.status.as_str(),
    )
}

fn action_form(job: &JobRow, action: &str, label: &str, csrf: &str) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"/dashboard/jobs/{}/{action}\">{}\
         <button type=\"submit\" data-action=\"{action}\">{label}</button></form>",
        job.id,
        csrf_field(csrf)
    )
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn cache(data: &Dashboard, days: i32) -> String {
    let chart = hit_rate_chart(&data.hit_rates);
    let mut rows = String::new();
    for (dimension, d) in data.stats.dimensions.iter().flatten() {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{:.2} %</td><td class=\"num\">${:.4}</td></tr>",
            escape(dimension),
            d.runs,
            d.redis_hits,
            d.postgres_hits,
            d.llm,
            d.hit_rate,
            d.cost_savings_usd
        );
    }
    let s = &data.stats;
    format!(
        "<section id=\"cache\"><h2>Cache, last {days} days</h2>\
         <p>Redis hit rate {:.2} % ({} hits, {} misses); database hit rate on Redis misses {:.2} %; \
         either tier {:.2} %. Health: <strong>{}</strong>.</p>\
         <div class=\"chart\"><h3>Hit rate per day and tier (%)</h3>{chart}</div>\
         <h3>Per dimension</h3><table><thead><tr><th>dimension</th><th>runs</th><th>redis</th>\
         <th>database</th><th>llm</th><th>hit rate</th><th>saved</th></tr></thead><tbody>{rows}</tbody></table>\
         </section>",
        s.redis.hit_rate,
        s.redis.hits,
        s.redis.misses,
        s.database.cache_hit_rate,
        s.database.overall_hit_rate,
        s.health.status.as_str(),
    )
}

fn hit_rate_chart(rates: &HitRates) -> String {
    let labels: Vec<String> = rates
        .days
        .iter()
        .map(|d| d.format("%m-%d").to_string())
        .collect();
    svg::line_chart(
        "cache hit rate per day",
        &labels,
        &[
            Series {
                name: "redis",
                color: "#c0392b",
                values: rates.redis.clone(),
            },
            Series {
                name: "database",
                color: "#2e86de",
                values: rates.database.clone(),
            },
        ],
        Some(100.0),
        "%",
    )
}

fn spend(data: &Dashboard, days: i32) -> String {
    let budget = |usd: f64| (usd > 0.0).then_some(usd);
    let bars = [
        Bar {
            label: "today (UTC)",
            value: data.spend.day_usd,
            limit: budget(data.budgets.daily_usd),
        },
        Bar {
            label: "this month",
            value: data.spend.month_usd,
            limit: budget(data.budgets.monthly_usd),
        },
    ];
    let c = &data.stats.cost_savings;
    format!(
        "<section id=\"spend\"><h2>LLM spend</h2><div class=\"chart\">{}</div>\
         <p>Last {days} days: paid ${:.4}; without caching ${:.4}; saved <strong>${:.4}</strong> \
         ({:.2} %), {} tokens not sent.</p></section>",
        svg::bar_chart("LLM spend against budget", &bars, "$"),
        c.cost_usd,
        c.cost_without_caching_usd,
        c.cost_savings_usd,
        c.savings_percent,
        c.tokens_saved
    )
}

/// The schedule panel.
pub fn schedule(schedule: &Schedule) -> String {
    let inner = match schedule {
        Schedule::NotConfigured => "<p class=\"empty\">scheduler not configured</p>".to_string(),
        Schedule::Failed(e) => format!(
            "<p class=\"error\">the scheduler could not list its entries: {}</p>",
            escape(e)
        ),
        Schedule::Entries(rows) => schedule_table(rows),
    };
    format!("<section id=\"schedule\"><h2>Schedule</h2>{inner}</section>")
}

fn schedule_table(rows: &[ScheduleRow]) -> String {
    let when = |t: Option<DateTime<Utc>>| t.map(time).unwrap_or_else(|| "never".into());
    let mut html = String::from(
        "<table><thead><tr><th>name</th><th>kind</th><th>cron</th><th>enabled</th>\
         <th>last run (UTC)</th><th>next run (UTC)</th></tr></thead><tbody>",
    );
    for r in rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.name),
            escape(&r.kind),
            escape(&r.cron),
            if r.enabled { "yes" } else { "no" },
            when(r.last_run),
            when(r.next_run),
        );
    }
    html.push_str("</tbody></table>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_panel_lists_entries_or_says_it_has_none() {
        assert!(schedule(&Schedule::NotConfigured).contains("scheduler not configured"));
        let html = schedule(&Schedule::Entries(vec![ScheduleRow {
            name: "<warm>".into(),
            kind: "warm_cache".into(),
            cron: "0 2 * * * Europe/Berlin".into(),
            enabled: true,
            last_run: None,
            next_run: Some("2026-12-03T01:00:00Z".parse().unwrap()),
        }]));
        assert!(html.contains("&lt;warm&gt;") && !html.contains("<warm>"));
        assert!(html.contains("never") && html.contains("2026-12-03 01:00:00"));
    }
}
